"""The scoring engine against a plain reference loop: one unpadded prompt at a time, full logits."""

from __future__ import annotations

import json

import pytest
import torch

from pervade.context import ContextSpec, make_context
from pervade.errors import ContextLoadError
from pervade.gpuworker.device import CPU_BATCH_TOKENS
from pervade.gpuworker.engine import (
    EncodedClaims,
    Scored,
    encode_claims,
    load_context,
    rows_per_pass,
    score_claims,
    score_encoded,
)
from pervade.producer.claims import sample_claims_path
from pervade.producer.templates import load_templates
from pervade.prompts import CONTENT_FREE_CLAIM, PromptTemplate
from tests.reference import reference_scores, reference_verdict


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_context(make_context(str(tiny_model)).spec, torch.device("cpu"))


def test_batched_scores_equal_the_reference_loop(loaded) -> None:
    """Every shipped template (plain and chat, several answer words, calibrated or not) on the sample claims."""
    claims = [json.loads(line)["claim"] for line in sample_claims_path().read_text().splitlines()]
    verdicts: dict[str, set[str]] = {}
    for template_id, template in load_templates().items():
        scored = score_claims(loaded, template, claims)
        assert scored.calibration == (
            pytest.approx(reference_scores(loaded, template, CONTENT_FREE_CLAIM), abs=1e-4)
            if template.calibrate
            else None
        )
        for verdict, scores, claim in zip(scored.verdicts, scored.scores, claims, strict=True):
            expected = reference_scores(loaded, template, claim)
            assert [s is None for s in scores] == [e is None for e in expected], template_id
            assert [s for s in scores if s is not None] == pytest.approx(
                [e for e in expected if e is not None], abs=1e-4
            )
            assert verdict == reference_verdict(loaded, template, expected)
            verdicts.setdefault(template_id, set()).add(verdict)
    # A random model's multi-token " NOT ENOUGH INFO" always scores lowest (a sum of three random tokens'
    # log-probabilities), but each template's other verdicts must vary, or this test would have no teeth.
    assert all(len(seen) >= 2 for seen in verdicts.values()), verdicts


def test_answers_of_several_tokens_are_scored_whole(loaded) -> None:
    """The tiny tokenizer splits " NOT ENOUGH INFO" into several tokens, and two answers may share a first
    token: whole-answer scores tell them apart where first-token logits could not."""
    assert len(loaded.tokenizer.encode(" NOT ENOUGH INFO", add_special_tokens=False)) > 1
    template = PromptTemplate(
        text="Claim: {claim}\nAnswer:", labels={"SUPPORTS": " NOT ENOUGH INFO", "REFUTES": " NOT SURE"}
    )
    first = {tuple(loaded.tokenizer.encode(a, add_special_tokens=False)[:1]) for a in template.labels.values()}
    assert len(first) == 1, "the two answers should share their first token"
    scored = score_claims(loaded, template, ["Paris is in France.", "Cats are mammals."])
    for scores, claim in zip(scored.scores, ["Paris is in France.", "Cats are mammals."], strict=True):
        assert scores[0] != scores[1] and scores[2] is None
        assert scores[:2] == pytest.approx(reference_scores(loaded, template, claim)[:2], abs=1e-4)


def test_a_label_left_out_is_never_predicted(loaded) -> None:
    template = PromptTemplate(text="Claim: {claim}\nAnswer:", labels={"SUPPORTS": " yes", "REFUTES": " no"})
    scored = score_claims(loaded, template, all_claims())
    assert "NOT ENOUGH INFO" not in scored.verdicts and all(row[2] is None for row in scored.scores)


def test_a_calibrating_template_subtracts_its_content_free_scores_computed_once(loaded) -> None:
    plain = PromptTemplate(text="Is it true? {claim}\nAnswer:", labels={"SUPPORTS": " true", "REFUTES": " false"})
    calibrated = PromptTemplate(text=plain.text, labels=plain.labels, calibrate=True)
    claims = all_claims()
    raw, adjusted = score_claims(loaded, plain, claims), score_claims(loaded, calibrated, claims)
    assert raw.scores == adjusted.scores and raw.calibration is None
    offset = adjusted.calibration[0] - adjusted.calibration[1]
    assert adjusted.verdicts == ["SUPPORTS" if s - r > offset else "REFUTES" for s, r, _ in adjusted.scores]
    assert adjusted.verdicts != raw.verdicts, "calibration should move some verdicts on these claims"
    before = dict(loaded.calibrations)
    score_claims(loaded, calibrated, claims[:3])
    assert loaded.calibrations == before, "the content-free scores are computed once per context"


def test_a_chat_template_formats_the_prompt_with_the_tokenizers_chat_template(loaded) -> None:
    template = PromptTemplate(text="Is this true? {claim}", chat=True, system="Be brief.")
    encoded = encode_claims(loaded, template, ["Cats are mammals."])
    expected = loaded.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is this true? Cats are mammals."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert loaded.tokenizer.decode(encoded.token_ids[0]) == expected
    assert expected.endswith("<|im_start|>assistant\n") and encoded.reuses == [True]


def test_a_chat_template_for_a_model_without_one_is_a_clear_error(loaded) -> None:
    saved = loaded.tokenizer.chat_template
    loaded.tokenizer.chat_template = None
    try:
        with pytest.raises(ValueError, match="has no chat template"):
            encode_claims(loaded, PromptTemplate(text="Only here: {claim}", chat=True), ["x"])
    finally:
        loaded.tokenizer.chat_template = saved


def test_claims_with_braces_are_inserted_verbatim(loaded) -> None:
    encoded = encode_claims(loaded, "Claim: {claim}\nAnswer:", ["f(x) = {x}"])
    assert loaded.tokenizer.decode(encoded.token_ids[0]) == "Claim: f(x) = {x}\nAnswer:"


def test_a_prompt_longer_than_the_model_is_an_error_not_a_truncation(loaded) -> None:
    with pytest.raises(ValueError, match="exceed the model's 2048 positions"):
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
        groups = loaded.plan.micro_batches([len(ids) for ids in encode_claims(loaded, template, claims).token_ids])
        assert len(groups) > 3
        split = score_claims(loaded, template, claims)
    finally:
        loaded.plan.max_tokens = budget
    assert split.verdicts == whole.verdicts
    for a, b in zip(split.scores, whole.scores, strict=True):
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
    assert got.verdicts == expected.verdicts
    for a, b in zip(got.scores, expected.scores, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


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
    """500 FEVER claims under every shipped template: the prefix KV path and the plain path agree on the
    verdict, and on the answer scores within fp32 rounding (a relative 1e-5 of the scores' size).
    bench/fidelity.py checks the same with the real model on more claims."""
    claims = fever_texts(500)
    for template_id, template in load_templates().items():
        encoded = encode_claims(loaded, template, claims)
        assert len(encoded.prefix_ids) > 0 and all(encoded.reuses), f"{template_id}: some claims missed the prefix"
        reused = score_encoded(loaded, encoded)
        plain = score_claims(loaded, template, claims, reuse_prefix=False)
        assert reused.calibration == plain.calibration
        scale = max(1.0, max(abs(x) for row in plain.scores for x in row if x is not None))
        tolerance = 1e-5 * scale
        for verdict, scores, plain_verdict, plain_scores in zip(
            reused.verdicts, reused.scores, plain.verdicts, plain.scores, strict=True
        ):
            assert max(abs(a - b) for a, b in zip(scores, plain_scores, strict=True) if a is not None) <= tolerance
            margins = sorted(
                (
                    s - (plain.calibration[i] if plain.calibration else 0.0)
                    for i, s in enumerate(plain_scores)
                    if s is not None
                ),
                reverse=True,
            )
            if margins[0] - margins[1] > 4 * tolerance:  # a tie within rounding may break either way
                assert verdict == plain_verdict


def test_a_claim_whose_tokens_cross_the_prefix_boundary_takes_the_plain_path(loaded) -> None:
    """A template cut mid-word: a claim that completes the word tokenizes differently from the prefix alone,
    so it must not reuse the prefix; the others in the same call still do. Both equal the reference."""
    template = "Is the claim true?\nVerdi{claim}\nAnswer:"
    claims = ["ct: Paris is the capital of France.", " Paris is the capital of France."]
    encoded = encode_claims(loaded, template, claims)
    assert encoded.reuses == [False, True]
    for scores, claim in zip(score_encoded(loaded, encoded).scores, claims, strict=True):
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
    alone = [score_encoded(loaded, first), score_encoded(loaded, second)]
    assert together.verdicts == alone[0].verdicts + alone[1].verdicts
    assert together.part(0, 2).verdicts == alone[0].verdicts and isinstance(together.part(2, 3), Scored)
    for a, b in zip(together.scores, alone[0].scores + alone[1].scores, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    other = encode_claims(loaded, load_templates()["verdict_only"], ["Cats are mammals."])
    with pytest.raises(ValueError, match="one template"):
        EncodedClaims.concat([first, other])


def test_rows_per_pass_follows_the_device_budget(loaded) -> None:
    encoded = encode_claims(loaded, load_templates()["direct"], fever_texts(200))
    rows = rows_per_pass(loaded, encoded)
    claim_tokens = sum(len(ids) - len(encoded.prefix_ids) for ids in encoded.token_ids) / len(encoded)
    cost = claim_tokens + sum(len(a) - 1 for a in encoded.prompt.answers if a is not None)  # answers packed
    assert loaded.plan.max_tokens / (cost + 8) < rows <= loaded.plan.max_tokens / cost


def other_architecture(tmp_path, tiny_model, config) -> ContextSpec:
    """A random model of another architecture with the tiny model's tokenizer, saved and loaded for real."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path)
    return ContextSpec(model=str(tmp_path))


def test_a_model_whose_head_scales_its_logits_is_refused_not_scored_wrong(tmp_path, tiny_model) -> None:
    """Granite divides its logits by ``logits_scaling``: scores computed from its hidden states with a plain
    linear head would be off, so loading it is a clear error."""
    from transformers import GraniteConfig

    vocab = len(load_context(ContextSpec(model=str(tiny_model)), torch.device("cpu")).tokenizer)
    config = GraniteConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0)  # fmt: skip
    with pytest.raises(ContextLoadError, match="output head does more than a linear layer"):
        load_context(other_architecture(tmp_path, tiny_model, config), torch.device("cpu"))


def test_a_prompt_beyond_a_sliding_attention_window_is_refused(tmp_path, tiny_model) -> None:
    from transformers import MistralConfig

    vocab = len(load_context(ContextSpec(model=str(tiny_model)), torch.device("cpu")).tokenizer)
    config = MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=16)  # fmt: skip
    context = load_context(other_architecture(tmp_path, tiny_model, config), torch.device("cpu"))
    assert len(score_claims(context, "{claim} Answer:", ["Cats are mammals."])) == 1
    with pytest.raises(ValueError, match="sliding attention window of 16"):
        encode_claims(context, "{claim} Answer:", ["Cats are mammals. " * 10])


def test_what_the_worker_cannot_score_fails_the_batch_with_the_reason(loaded) -> None:
    """Templates come from any producer: the worker checks them again, and what only the model can tell."""
    bogus = PromptTemplate(text="{claim} Answer:", labels={"SUPPORTS": " yes", "BOGUS": " no"})
    with pytest.raises(ValueError, match="'BOGUS' is not a FEVER label"):
        encode_claims(loaded, bogus, ["Cats are mammals."])
    with pytest.raises(ValueError, match="a prompt of no tokens"):
        encode_claims(loaded, "{claim}", [""])
    long_answer = PromptTemplate(text="{claim} Answer:", labels={"SUPPORTS": " yes" * 40, "REFUTES": " no"})
    with pytest.raises(ValueError, match=r"the answer for SUPPORTS is \d+ tokens; at most 32 are scored"):
        encode_claims(loaded, long_answer, ["Cats are mammals."])
