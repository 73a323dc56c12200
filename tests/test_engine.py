"""The scoring engine against a plain reference loop: one unpadded prompt at a time, full logits."""

from __future__ import annotations

import json

import pytest
import torch

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
