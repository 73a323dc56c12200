"""What whole-answer scoring costs against the first-token pass it replaced, on the same claims.

    .venv/bin/python bench/answer_scoring.py                 # SmolLM2-135M-Instruct, 256 FEVER claims, CPU fp32
    .venv/bin/python bench/answer_scoring.py --model DIR --device cuda --dtype bfloat16

The engine alone (``gpuworker/engine.py``, no broker), two prompts (``TEXTS``), prefix KV reused, the worker's
micro-batches. Rows, per prompt:

- **first-token**: one forward pass per micro-batch, each label judged by its answer's first token only (the
  scoring before whole answers: the same pass, with every answer cut to its first token, so the second pass
  never runs);
- **whole, <= 4 tokens**: three answers of up to four tokens each, scored whole (two passes);
- **whole, default answers**: the labels' own names (" NOT ENOUGH INFO" is 7 tokens for SmolLM2);
- **whole, 1 token**: two one-token answers (" true" / " false"): one pass, as first-token.

Each variant runs ``--repeats`` times, alternating, after a warm-up; the table gives the median seconds, the
claims per second and the ratio to first-token (the target: at most 1.3 for answers of up to 4 tokens).
Tokenization is done before timing (a worker tokenizes on another thread while the device computes).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from benchkit import DEFAULT_OUT_DIR, Report

from pervade.context import ContextSpec
from pervade.gpuworker.device import select_device
from pervade.gpuworker.engine import EncodedClaims, encode_claims, load_context, score_encoded
from pervade.producer.claims import ClaimsSource, read_claims, sample_claims_path
from pervade.producer.templates import load_templates
from pervade.prompts import PromptTemplate

FEVER_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fever" / "paper_dev.jsonl"
#: Two prompts: the answer asked for just after the claim (the claim is nearly all the tokens each claim costs),
#: and the shipped "direct" template, whose instructions after the claim make each claim's part longer.
TEXTS = {
    "claim-then-answer": "Is the following claim true, false, or is there not enough information?\nClaim: {claim}\nAnswer:",
    "direct": load_templates()["direct"].text,
}
#: Answers of up to four tokens each for SmolLM2's tokenizer (the bench prints each one's count).
SHORT = {"SUPPORTS": " SUPPORTS", "REFUTES": " REFUTES", "NOT ENOUGH INFO": " UNKNOWN"}
DEFAULT = None
ONE_TOKEN = {"SUPPORTS": " true", "REFUTES": " false"}


def first_token_only(encoded: EncodedClaims) -> EncodedClaims:
    """The same claims with every answer cut to its first token: the first-token pass."""
    answers = tuple(a[:1] if a is not None else None for a in encoded.prompt.answers)
    return dataclasses.replace(encoded, prompt=dataclasses.replace(encoded.prompt, answers=answers))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model directory (default: SmolLM2-135M-Instruct, converted)")
    parser.add_argument("--claims", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()
    if args.model is None:
        from pervade.smollm2 import ensure_smollm2

        args.model = ensure_smollm2()
    source = FEVER_DEV if FEVER_DEV.exists() else sample_claims_path()
    texts = [c.text for c in read_claims(ClaimsSource(str(source), limit=args.claims))]
    device = select_device(args.device)
    context = load_context(ContextSpec(model=str(args.model), dtype=args.dtype), device)
    report = Report("answer_scoring", ["prompt", "claim_part_tokens", "variant", "answer_tokens", "claims",
                                       "median_s", "claims_per_s", "vs_first_token"], out_dir=args.out_dir)  # fmt: skip
    report.header(f"model {args.model.name}, {context.dtype} on {device}, {len(texts)} claims of {source.name}, "
                  f"template prefix reused, median of {args.repeats}")  # fmt: skip
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for prompt, text in TEXTS.items():
        short = encode_claims(context, PromptTemplate(text=text, labels=SHORT), texts)
        variants = {
            "first-token": first_token_only(short),
            "whole, <= 4 tokens": short,
            "whole, default answers": encode_claims(context, PromptTemplate(text=text, labels=DEFAULT), texts),
            "whole, 1 token": encode_claims(context, PromptTemplate(text=text, labels=ONE_TOKEN), texts),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for encoded in variants.values():
            score_encoded(context, encoded)  # warm-up: the prefix's cache, the allocator
        for _ in range(args.repeats):
            for name, encoded in variants.items():
                sync()
                started = time.perf_counter()
                score_encoded(context, encoded)
                sync()
                times[name].append(time.perf_counter() - started)
        base = statistics.median(times["first-token"])
        part = sum(len(ids) - len(short.prefix_ids) for ids in short.token_ids) / len(texts)
        for name, encoded in variants.items():
            median = statistics.median(times[name])
            tokens = "/".join(str(len(a)) for a in encoded.prompt.answers if a is not None)
            report.add(prompt=prompt, claim_part_tokens=round(part, 1), variant=name, answer_tokens=tokens,
                       claims=len(texts), median_s=round(median, 3), claims_per_s=round(len(texts) / median, 1),
                       vs_first_token=round(median / base, 3))  # fmt: skip
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
