"""The plain reference loop the pipeline's verdicts are checked against (the tests and bench/fidelity.py): one
prompt at a time, unpadded, no template prefix cache, no batching; each answer's tokens scored after its prompt
with the log-softmax over the whole vocabulary. Written independently of gpuworker/answers.py (no padding, no
masks, no positions of its own), so the two can only agree by being right."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path

import msgspec
import torch

from pervade.context import make_context
from pervade.gpuworker.engine import LoadedContext, load_context
from pervade.prompts import CONTENT_FREE_CLAIM, PromptTemplate, as_template, choose
from pervade.protocol import Claim


def reference_scores(context: LoadedContext, template: PromptTemplate | str, claim: str) -> list[float | None]:
    """Each label's answer log-probability after the prompt of ``claim`` (None for a label left out): the
    prompt alone through the model, then each answer's tokens after it (on a copy of the prompt's cache)."""
    template = as_template(template)
    prompt = template.text
    if template.chat:
        messages = [{"role": "system", "content": template.system}] if template.system else []
        prompt = context.tokenizer.apply_chat_template(
            [*messages, {"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    ids = context.tokenizer(prompt.replace("{claim}", claim), add_special_tokens=False)["input_ids"]
    bos = context.tokenizer.bos_token_id
    if not template.chat and bos is not None and context.tokenizer("x")["input_ids"][:1] == [bos]:
        ids = [bos, *ids]  # the tokenizer's own start; never its end (an EOS before the answer)
    with torch.inference_mode():
        out = context.model(torch.tensor([ids], device=context.device), use_cache=True)
        after_prompt = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        scores: list[float | None] = []
        for answer in template.answers:
            if answer is None:
                scores.append(None)
                continue
            tokens = context.tokenizer.encode(answer, add_special_tokens=False)
            score = after_prompt[tokens[0]].item()
            if len(tokens) > 1:
                more = context.model(
                    torch.tensor([tokens[:-1]], device=context.device), past_key_values=copy.deepcopy(out.past_key_values)
                )
                log_probs = torch.log_softmax(more.logits[0].float(), dim=-1)
                score += sum(log_probs[k, token].item() for k, token in enumerate(tokens[1:]))
            scores.append(score)
    return scores


def reference_verdict(context: LoadedContext, template: PromptTemplate | str, scores: list[float | None]) -> str:
    """The verdict for ``scores``: calibrated by the content-free claim's scores where the template asks."""
    template = as_template(template)
    calibration = reference_scores(context, template, CONTENT_FREE_CLAIM) if template.calibrate else None
    return choose(scores, calibration)


def reference_verdicts(
    model_dir: Path, templates: Mapping[str, PromptTemplate | str | dict], claims: Iterable[Claim]
) -> dict[tuple[str, str], tuple[str, list[float | None]]]:
    """(claim id, template id) -> (verdict, scores) for every pair, the plain way."""
    context = load_context(make_context(str(model_dir)).spec, torch.device("cpu"))
    claims = list(claims)
    expected = {}
    for template_id, template in templates.items():
        template = msgspec.convert(template, PromptTemplate) if isinstance(template, dict) else as_template(template)
        calibration = reference_scores(context, template, CONTENT_FREE_CLAIM) if template.calibrate else None
        for claim in claims:
            scores = reference_scores(context, template, claim.text)
            expected[(claim.claim_id, template_id)] = (choose(scores, calibration), scores)
    return expected
