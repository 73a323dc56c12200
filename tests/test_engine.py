"""The scoring engine against a plain reference loop: one unpadded prompt at a time, full logits."""

from __future__ import annotations

import json

import pytest
import torch

from gpuworker.device import CPU_BATCH_TOKENS
from gpuworker.engine import label_token_ids, load_context, render_prompt, score_claims
from pervade.constants import LABELS
from pervade.context import ContextSpec, make_context
from pervade.errors import ContextLoadError
from producer.claims import sample_claims_path
from producer.templates import load_templates


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
