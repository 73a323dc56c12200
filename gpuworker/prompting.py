"""A prompt template made concrete for one tokenizer: the prompt text (in the model's chat format where the
template asks for it) and the token ids of each label's answer.

A chat template is applied once, with the ``{claim}`` placeholder still in the user message, so that the
rendered chat is itself a plain template: every claim's prompt is then a string substitution, and the text
before the claim is the same for every claim, so its KV cache is reused exactly as for a plain template
(``gpuworker/prefix.py``).

Answers are tokenized on their own and appended to the prompt's tokens (never tokenized together with the
prompt, which could merge the prompt's last characters with the answer's first): the score of an answer is
then the same whatever prompt precedes it, and the reference loop of bench/fidelity.py computes the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from pervade.constants import CLAIM_PLACEHOLDER, LABELS
from pervade.prompts import CONTENT_FREE_CLAIM, PromptTemplate, claim_text_ok


@dataclass(frozen=True)
class ResolvedPrompt:
    """A template for one tokenizer. Built on the tokenizer thread (``resolve_prompt``)."""

    template: PromptTemplate
    #: The prompt with ``{claim}`` once: the template's text, or its chat rendering.
    text: str
    #: Whether encoding adds the tokenizer's special tokens (a BOS): yes for a plain prompt, as the model
    #: expects; no for a chat rendering, which writes its own.
    special_tokens: bool
    #: Each label's answer tokens, in ``LABELS`` order; None for a label the template leaves out.
    answers: tuple[tuple[int, ...] | None, ...]
    #: The content-free prompt's tokens, for a calibrating template (else None).
    calibration_ids: tuple[int, ...] | None

    def render(self, claim: str) -> str:
        """The prompt for one claim. ``str.replace``, not ``format``: claims may contain braces."""
        return self.text.replace(CLAIM_PLACEHOLDER, claim)

    def encode(self, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
        """Token ids of ``texts`` (prompts, or a prefix of them) as this prompt encodes them."""
        return tokenizer(texts, add_special_tokens=self.special_tokens)["input_ids"] if texts else []

    @property
    def longest_answer(self) -> int:
        return max((len(a) for a in self.answers if a is not None), default=0)


def resolve_prompt(tokenizer: PreTrainedTokenizerBase, template: PromptTemplate) -> ResolvedPrompt:
    """``template`` for ``tokenizer``. Raises ValueError naming what does not fit the model: a chat template
    for a tokenizer without one, an answer that is no tokens, two answers of the same tokens."""
    if not claim_text_ok(template):
        raise ValueError(f"the template's text must contain {CLAIM_PLACEHOLDER} exactly once")
    text, special_tokens = template.text, True
    if template.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the template asks for chat formatting (\"chat\": true), but the model's tokenizer "
                             "has no chat template")  # fmt: skip
        messages = [{"role": "system", "content": template.system}] if template.system else []
        messages.append({"role": "user", "content": template.text})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        special_tokens = False
        if not isinstance(text, str) or text.count(CLAIM_PLACEHOLDER) != 1:
            raise ValueError("the model's chat template does not keep the user message as it is")
    answers: list[tuple[int, ...] | None] = []
    for label, answer in zip(LABELS, template.answers, strict=True):
        if answer is None:
            answers.append(None)
            continue
        ids = tuple(tokenizer.encode(answer, add_special_tokens=False))
        if not ids:
            raise ValueError(f"the answer {answer!r} for {label} is no tokens for this model's tokenizer")
        answers.append(ids)
    scored = [a for a in answers if a is not None]
    if not scored:
        raise ValueError("the template scores no label")
    if len(set(scored)) != len(scored):
        raise ValueError(f"two answers of the template are the same tokens for this model ({scored})")
    resolved = ResolvedPrompt(template, text, special_tokens, tuple(answers), None)
    if template.calibrate:
        (ids,) = resolved.encode(tokenizer, [resolved.render(CONTENT_FREE_CLAIM)])
        resolved = ResolvedPrompt(template, text, special_tokens, tuple(answers), tuple(ids))
    return resolved
