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
from pervade.errors import TemplateError
from pervade.prompts import CONTENT_FREE_CLAIM, PromptTemplate, check_template

#: The longest answer a template may ask to score, in tokens: answers are words ("true", "NOT ENOUGH INFO"),
#: and each answer token is packed into every row of a pass (gpuworker/answers.py).
MAX_ANSWER_TOKENS = 32


@dataclass(frozen=True)
class ResolvedPrompt:
    """A template for one tokenizer. Built on the tokenizer thread (``resolve_prompt``)."""

    template: PromptTemplate
    #: The prompt with ``{claim}`` once: the template's text, or its chat rendering.
    text: str
    #: The special tokens a prompt starts with (``leading_special_tokens``: a BOS, for tokenizers that add
    #: one); none for a chat rendering, which writes its own. Never any at the end: an answer follows.
    leading: tuple[int, ...]
    #: Each label's answer tokens, in ``LABELS`` order; None for a label the template leaves out.
    answers: tuple[tuple[int, ...] | None, ...]
    #: The content-free prompt's tokens, for a calibrating template (else None).
    calibration_ids: tuple[int, ...] | None

    def render(self, claim: str) -> str:
        """The prompt for one claim. ``str.replace``, not ``format``: claims may contain braces."""
        return self.text.replace(CLAIM_PLACEHOLDER, claim)

    def encode(self, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
        """Token ids of ``texts`` (prompts, or a prefix of them) as this prompt encodes them."""
        if not texts:
            return []
        return [[*self.leading, *ids] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def resolve_prompt(tokenizer: PreTrainedTokenizerBase, template: PromptTemplate) -> ResolvedPrompt:
    """``template`` for ``tokenizer``. Raises ValueError naming what does not fit the model: a chat template
    for a tokenizer without one, an answer that is no tokens, two answers of the same tokens."""
    try:  # what the producer checked, checked again: a batch may come from any producer
        template = check_template(template, "the template")
    except TemplateError as exc:
        raise ValueError(str(exc)) from None
    text, leading = template.text, leading_special_tokens(tokenizer)
    if template.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the template asks for chat formatting (\"chat\": true), but the model's tokenizer "
                             "has no chat template")  # fmt: skip
        messages = [{"role": "system", "content": template.system}] if template.system else []
        messages.append({"role": "user", "content": template.text})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        leading = ()
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
        if len(ids) > MAX_ANSWER_TOKENS:
            raise ValueError(f"the answer for {label} is {len(ids)} tokens; at most {MAX_ANSWER_TOKENS} are scored")
        answers.append(ids)
    scored = [a for a in answers if a is not None]
    if not scored:
        raise ValueError("the template scores no label")
    if len(set(scored)) != len(scored):
        raise ValueError(f"two answers of the template are the same tokens for this model ({scored})")
    resolved = ResolvedPrompt(template, text, leading, tuple(answers), None)
    if template.calibrate:
        (ids,) = resolved.encode(tokenizer, [resolved.render(CONTENT_FREE_CLAIM)])
        resolved = ResolvedPrompt(template, text, leading, tuple(answers), tuple(ids))
    return resolved


def leading_special_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The special tokens the tokenizer puts before a text (a BOS), without those it puts after (an EOS,
    which would end the prompt before its answer)."""
    whole = tokenizer("x")["input_ids"]
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    for start in range(len(whole) - len(bare) + 1):
        if whole[start : start + len(bare)] == bare:
            return tuple(whole[:start])
    return ()
