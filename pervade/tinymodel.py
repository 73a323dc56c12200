"""Build a model of SmolLM2's architecture (LlamaForCausalLM) offline: random weights, a byte-level BPE
tokenizer trained on the spot with ``tokenizers``. It loads through the same ``from_pretrained`` code path
as a hub model, so tests and offline runs exercise the real loading code with no network.

The same seed gives the same weights and the same tokenizer, so verdicts are reproducible across runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pervade.constants import LABELS
from pervade.errors import ConfigError
from pervade.samples import default_templates_path, sample_claims_path


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int  # at least the trained tokenizer's size
    #: Std of the random init. Tiny models use a large one so that the claim, not only the prompt's last
    #: token, decides the verdict: tests comparing verdicts need verdicts that vary.
    init_std: float = 0.02


#: Sizes: ``tiny`` for tests, ``small`` for CPU benchmarks, ``medium`` (about 110 MB of weights) for tests and
#: benchmarks of model-file transfer, and SmolLM2's real shapes for GPU benchmarks.
SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=0, init_std=0.5),
    "small": ModelShape(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=1024, vocab=0, init_std=0.2),
    "medium": ModelShape(hidden=512, layers=6, heads=8, kv_heads=4, intermediate=1536, vocab=16384, init_std=0.1),
    "smollm2-135m": ModelShape(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152),
    "smollm2-1.7b": ModelShape(hidden=2048, layers=24, heads=32, kv_heads=32, intermediate=8192, vocab=49152),
}

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

#: ChatML, as SmolLM2's tokenizer formats a chat (without its default system message), so that templates
#: with ``"chat": true`` run on the tiny models too.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _training_corpus() -> list[str]:
    """Text the tokenizer learns from: the shipped claims and templates, and the label words, so that
    each label's first token is a word of its own, as in a real vocabulary."""
    lines = [json.loads(line)["claim"] for line in sample_claims_path().read_text().splitlines() if line.strip()]
    for template in json.loads(default_templates_path().read_text(encoding="utf-8")).values():
        if isinstance(template, str):
            template = {"text": template}
        lines += [template["text"], template.get("system", ""), *template.get("labels", {}).values()]
    lines += [f"Answer: {label}" for label in LABELS] * 50
    return lines


def build_tiny_model(
    out_dir: Path, size: str = "tiny", seed: int = 0, vocab_size: int = 2048, save_dtype: str = "float32"
) -> Path:
    """Write a randomly initialised LlamaForCausalLM and its tokenizer to ``out_dir``; returns the path.
    ``save_dtype`` is the dtype of the weight files (``bfloat16``: as SmolLM2 ships, half the bytes to load)."""
    if size not in SHAPES:
        raise ConfigError(f"unknown size {size!r}; choose one of {', '.join(SHAPES)}")
    if save_dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"unknown save dtype {save_dtype!r}; choose float32, bfloat16 or float16")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE

    shape = SHAPES[size]
    config = LlamaConfig(
        vocab_size=max(shape.vocab, len(fast)),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        initializer_range=shape.init_std,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, save_dtype))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir
