"""The scoring engine against a plain reference loop: one unpadded prompt at a time, full logits."""

from __future__ import annotations

import json

import pytest
import torch

from pervade.constants import LABELS
from pervade.context import ContextSpec, make_context
from pervade.errors import ContextLoadError
from pervade.gpuworker.device import CPU_BATCH_TOKENS
from pervade.gpuworker.engine import (
    EncodedClaims,
    encode_claims,
    label_token_ids,
    load_context,
    render_prompt,
    rows_per_pass,
    score_claims,
    score_encoded,
)
from pervade.producer.claims import sample_claims_path
from pervade.producer.templates import load_templates


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_context(make_context(str(tiny_model)).spec, torch.device("cpu"))


def reference_scores(loaded, template: str, claim: str) -> list[float]:
    encoded = loaded.tokenizer(render_prompt(template, claim), return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**encoded).logits[0, -1, loaded.label_ids].tolist()


def test_batched_scores_equal_the_reference_loop(loaded) -> None:
    claims = [json.loads(line)["claim"] for line in sample_claims_path().read_text().splitlines()]
    verdicts = set()
    for template in load_templates().values():
        for (verdict, scores), claim in zip(score_claims(loaded, template, claims), claims, strict=True):
            expected = reference_scores(loaded, template, claim)
            assert scores == pytest.approx(expected, abs=1e-4)
            assert verdict == LABELS[max(range(3), key=expected.__getitem__)]
            verdicts.add(verdict)
    assert verdicts == set(LABELS), "a model that always says the same thing would make this test toothless"


def test_labels_score_on_distinct_first_tokens(loaded) -> None:
    assert len(set(loaded.label_ids)) == 3
    assert [loaded.tokenizer.decode([i]).strip() for i in loaded.label_ids] == ["SUPPORTS", "REFUTES", "NOT"]


def test_labels_sharing_a_first_token_are_refused(loaded) -> None:
    with pytest.raises(ContextLoadError, match="share a first token"):
        label_token_ids(loaded.tokenizer, ["NOT ENOUGH INFO", "NOT SURE"])


def test_claims_with_braces_are_inserted_verbatim() -> None:
    assert render_prompt("Claim: {claim}\nAnswer:", "f(x) = {x}") == "Claim: f(x) = {x}\nAnswer:"


def test_a_prompt_longer_than_the_model_is_an_error_not_a_truncation(loaded) -> None:
    with pytest.raises(ValueError, match="exceeds the model's 2048 positions"):
        score_claims(loaded, "{claim}", ["word " * 3000])


def test_a_model_that_does_not_exist_is_a_context_load_error(tmp_path) -> None:
    with pytest.raises(ContextLoadError, match="cannot load"):
        load_context(ContextSpec(model=str(tmp_path)), torch.device("cpu"))


def all_claims() -> list[str]:
    return [json.loads(line)["claim"] for line in sample_claims_path().read_text().splitlines()]


def test_micro_batches_give_the_one_pass_scores_in_input_order(loaded) -> None:
    template = next(iter(load_templates().values()))
    claims = all_claims()
    whole = score_claims(loaded, template, claims)
    budget = loaded.plan.max_tokens
    try:
        loaded.plan.max_tokens = 200  # a few prompts per micro-batch, several micro-batches per batch
        groups = loaded.plan.micro_batches([len(loaded.tokenizer(render_prompt(template, c))["input_ids"]) for c in claims])
        assert len(groups) > 3
        split = score_claims(loaded, template, claims)
    finally:
        loaded.plan.max_tokens = budget
    assert [v for v, _ in split] == [v for v, _ in whole]
    for (_, a), (_, b) in zip(split, whole, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_a_micro_batch_out_of_device_memory_is_split_and_retried(loaded, monkeypatch) -> None:
    """Fault injection: the model refuses any pass over 120 padded tokens, as a small GPU would."""
    template = next(iter(load_templates().values()))
    claims = all_claims()[:16]
    expected = score_claims(loaded, template, claims)
    real_forward = loaded.model.base_model.forward
    seen: list[int] = []

    def small_gpu(input_ids, **kwargs):
        seen.append(input_ids.numel())
        if input_ids.numel() > 120:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_forward(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(loaded.model.base_model, "forward", small_gpu)
    budget = loaded.plan.max_tokens
    try:
        got = score_claims(loaded, template, claims)
        assert loaded.plan.max_tokens <= 120, "the plan should shrink for good after running out of memory"
    finally:
        loaded.plan.max_tokens = budget
    assert any(n > 120 for n in seen) and max(n for n in seen[-3:]) <= 120
    for (va, a), (vb, b) in zip(got, expected, strict=True):
        assert va == vb and a == pytest.approx(b, abs=1e-4)


def test_a_claim_that_alone_exceeds_device_memory_fails_the_batch(loaded, monkeypatch) -> None:
    def no_memory(input_ids, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(loaded.model.base_model, "forward", no_memory)
    budget = loaded.plan.max_tokens
    try:
        with pytest.raises(torch.OutOfMemoryError):
            score_claims(loaded, "{claim}", ["one claim", "two claims here"])
    finally:
        loaded.plan.max_tokens = budget


def test_the_cpu_loads_auto_in_float32_with_the_cpu_budget(loaded) -> None:
    assert loaded.dtype == "float32"
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.plan.max_tokens == CPU_BATCH_TOKENS


def fever_texts(limit: int | None = None) -> list[str]:
    """Real FEVER claims when ../shared has them, else the shipped sample."""
    from tests.conftest import FEVER_DEV

    path = FEVER_DEV if FEVER_DEV.exists() else sample_claims_path()
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line)["claim"] for line in lines[:limit]]


def test_prefix_reuse_gives_the_plain_path_verdicts_on_every_claim(loaded) -> None:
    """Every FEVER claim under every default template: the prefix KV path and the plain path agree on the
    verdict, and on the label logits within fp32 rounding (a relative 1e-5 of the logits' size)."""
    claims = fever_texts()
    for template_id, template in load_templates().items():
        encoded = encode_claims(loaded, template, claims)
        assert len(encoded.prefix_ids) > 0 and all(encoded.reuses), f"{template_id}: some claims missed the prefix"
        reused = score_encoded(loaded, encoded)
        plain = score_claims(loaded, template, claims, reuse_prefix=False)
        scale = max(1.0, max(abs(x) for _, row in plain for x in row))
        tolerance = 1e-5 * scale
        for (verdict, scores), (plain_verdict, plain_scores) in zip(reused, plain, strict=True):
            assert max(abs(a - b) for a, b in zip(scores, plain_scores, strict=True)) <= tolerance
            top, second = sorted(plain_scores, reverse=True)[:2]
            if top - second > 2 * tolerance:  # a tie within rounding may break either way
                assert verdict == plain_verdict


def test_a_claim_whose_tokens_cross_the_prefix_boundary_takes_the_plain_path(loaded) -> None:
    """A template cut mid-word: a claim that completes the word tokenizes differently from the prefix alone,
    so it must not reuse the prefix; the others in the same call still do. Both equal the reference."""
    template = "Is the claim true?\nVerdi{claim}\nAnswer:"
    claims = ["ct: Paris is the capital of France.", " Paris is the capital of France."]
    encoded = encode_claims(loaded, template, claims)
    assert encoded.reuses == [False, True]
    for (_, scores), claim in zip(score_encoded(loaded, encoded), claims, strict=True):
        assert scores == pytest.approx(reference_scores(loaded, template, claim), abs=1e-4)


def test_a_template_prefix_is_run_once_per_context(tiny_model) -> None:
    context = load_context(make_context(str(tiny_model)).spec, torch.device("cpu"))
    templates = list(load_templates().values())
    for _ in range(3):
        for template in templates[:2]:
            score_claims(context, template, ["Paris is in France.", "The moon is made of cheese."])
    assert context.prefixes.built == 2


def test_batches_scored_together_equal_batches_scored_alone(loaded) -> None:
    template = load_templates()["direct"]
    first = encode_claims(loaded, template, ["Paris is in France.", "Cats are mammals."])
    second = encode_claims(loaded, template, ["The moon is made of cheese."])
    together = score_encoded(loaded, EncodedClaims.concat([first, second]))
    alone = score_encoded(loaded, first) + score_encoded(loaded, second)
    assert [v for v, _ in together] == [v for v, _ in alone]
    for (_, a), (_, b) in zip(together, alone, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    other = encode_claims(loaded, load_templates()["fact_checker"], ["Cats are mammals."])
    with pytest.raises(ValueError, match="one template"):
        EncodedClaims.concat([first, other])


def test_rows_per_pass_follows_the_device_budget(loaded) -> None:
    encoded = encode_claims(loaded, load_templates()["direct"], fever_texts(200))
    rows = rows_per_pass(loaded, encoded)
    claim_tokens = sum(len(ids) - len(encoded.prefix_ids) for ids in encoded.token_ids) / len(encoded)
    assert loaded.plan.max_tokens / (claim_tokens + 2) < rows <= loaded.plan.max_tokens / claim_tokens
