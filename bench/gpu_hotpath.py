"""The inference hot path on one device, against the device's FLOP limit, and the model's load time.

    .venv/bin/python bench/gpu_hotpath.py                       # on a GPU: SmolLM2-1.7B shape, bf16
    .venv/bin/python bench/gpu_hotpath.py --size small          # CPU mode (what a machine without GPU runs)

What it does, in one process (no broker: this is the engine alone, ``gpuworker/engine.py``):

1. Builds a randomly initialised model of the chosen shape (default on a GPU: SmolLM2-1.7B, hidden 2048,
   24 layers, 32 heads, vocabulary 49,152) with ``pervade.tinymodel``, saved in bf16 as SmolLM2 ships, in a
   local directory (``--model-dir`` to reuse one).
2. **Load time**: ``load_context`` from that local directory to the device (tokenizer, weights, to device,
   label rows), twice; the second is the warm figure (files in the page cache), the first the cold one as
   far as this machine allows (no cache drop without root privileges on a shared node).
3. Encodes real FEVER claims (``--claims``, default ../shared/data/fever/paper_dev.jsonl, else the shipped
   sample) under a template whose prefix is about ``--prefix-words`` words long (the paper's Prompt-for-Fact
   templates carry ~150 tokens of instructions), then scores them with the plain path (every prompt whole)
   and with the prefix KV reused, after a warm-up pass each. Tokenization is timed apart: in a worker it
   runs on another thread while the device computes.
4. **The FLOP limit**: a dense matmul in the device's dtype gives the peak FLOP/s this device reaches (on an
   H200 in bf16 about 790 TFLOP/s was measured: ../shared/reference/inference.md). A claim costs
   ``2 x non-embedding parameters`` FLOPs per token it runs through the model (attention and the label head
   are left out, as in the issue's arithmetic: 3.22 GFLOP/token for SmolLM2-1.7B). So the limit is
   ``peak / (2 N tokens)`` claims/s: plain, tokens = the whole prompt; with reuse, tokens = the claim part.
   The table gives claims/s measured, the limit, and the share of it reached (the target is >= 50%).

Every row is printed, written to ``bench/results/gpu_hotpath.csv`` and drawn in ``gpu_hotpath.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchkit import DEFAULT_OUT_DIR, Report

from pervade.context import ContextSpec
from pervade.gpuworker.device import select_device
from pervade.gpuworker.engine import encode_claims, load_context, score_encoded
from pervade.producer.claims import sample_claims_path
from pervade.tinymodel import build_tiny_model

FEVER_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fever" / "paper_dev.jsonl"

#: Instructions in the manner of the paper's fact-checking templates; repeated to reach --prefix-words.
INSTRUCTIONS = (
    "You are a meticulous fact checker working on the FEVER shared task. For every claim decide, from what you "
    "know about the world and what Wikipedia says, whether the evidence SUPPORTS the claim, REFUTES the claim, "
    "or whether there is NOT ENOUGH INFO to decide. Judge only the claim as written; do not assume facts that are "
    "not widely documented, and prefer NOT ENOUGH INFO over a guess. "
)


def long_template(words: int) -> str:
    """A template whose text before the claim has about ``words`` words."""
    text = ""
    while len(text.split()) < words:
        text += INSTRUCTIONS
    text = " ".join(text.split()[:words])
    return f"{text}\nClaim: {{claim}}\nAnswer:"


def read_texts(path: Path, limit: int) -> list[str]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    texts = [json.loads(line)["claim"] for line in lines]
    while len(texts) < limit:  # the shipped sample is short: repeat it
        texts += texts
    return texts[:limit]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10, trials: int = 3) -> float:
    """FLOP/s of a dense ``size`` x ``size`` matmul in ``dtype``, best of ``trials``: what this device
    reaches in practice."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    synchronize(device)
    best = 0.0
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        synchronize(device)
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - started))
    return best


def non_embedding_parameters(model: torch.nn.Module) -> int:
    embedding = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - embedding  # tied output head counted once, as embedding


def timed_scoring(context, encoded, device: torch.device, repeats: int) -> float:
    """Seconds per scoring of ``encoded`` (best of ``repeats``, after a warm-up)."""
    score_encoded(context, encoded)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        score_encoded(context, encoded)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> int:
    device = select_device("auto")
    on_gpu = device.type == "cuda"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="smollm2-1.7b" if on_gpu else "small", help="model shape (pervade.tinymodel)")
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse (or keep) the built model here")
    parser.add_argument("--claims", type=Path, default=FEVER_DEV if FEVER_DEV.exists() else sample_claims_path())
    parser.add_argument("--limit", type=int, default=8192 if on_gpu else 256, help="claims scored per pass")
    parser.add_argument("--prefix-words", type=int, default=80, help="words of instructions before the claim")
    parser.add_argument(
        "--repeats", type=int, default=3 if on_gpu else 2, help="timed passes per path (best is reported)"
    )
    parser.add_argument("--matmul-size", type=int, default=8192 if on_gpu else 2048)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="pervade-hotpath-") as tmp:
        model_dir = args.model_dir or Path(tmp) / args.size
        if not (model_dir / "config.json").exists():
            started = time.perf_counter()
            build_tiny_model(model_dir, args.size, save_dtype="bfloat16" if on_gpu else "float32")
            print(f"# built {args.size} in {time.perf_counter() - started:.1f} s at {model_dir}", file=sys.stderr)
        return run(args, device, model_dir)


def run(args: argparse.Namespace, device: torch.device, model_dir: Path) -> int:
    spec = ContextSpec(model=str(model_dir), dtype="auto")
    loads = []
    for _ in range(2):
        context = load_context(spec, device)
        synchronize(device)
        loads.append(context.load_seconds)
        if len(loads) == 1:
            del context
            if device.type == "cuda":
                torch.cuda.empty_cache()
    dtype = getattr(torch, context.dtype)
    peak = peak_flops(device, dtype, args.matmul_size)
    params = non_embedding_parameters(context.model)

    template = long_template(args.prefix_words)
    texts = read_texts(args.claims, args.limit)
    started = time.perf_counter()
    reused = encode_claims(context, template, texts)
    tokenize_s = time.perf_counter() - started
    plain = encode_claims(context, template, texts, reuse_prefix=False)
    prefix_tokens = len(reused.prefix_ids)
    whole = sum(len(ids) for ids in plain.token_ids) / len(texts)
    claim_part = whole - prefix_tokens

    report = Report("gpu_hotpath", ["path", "claims", "tokens_per_claim", "seconds", "claims_per_s",
                                    "flop_limit_claims_per_s", "share_of_limit"], out_dir=args.out_dir)  # fmt: skip
    report.header(
        f"model {args.size} ({params / 1e6:,.0f}M non-embedding parameters), {context.dtype} on {device}, "
        f"micro-batch budget {context.plan.max_tokens} tokens",
        f"claims {args.claims.name} x {len(texts)}, prefix {prefix_tokens} tokens, whole prompt {whole:.1f} tokens",
        f"peak {peak / 1e12:.2f} TFLOP/s ({args.matmul_size}^3 matmul, {dtype})",
    )
    for name, encoded, tokens in (("plain", plain, whole), ("prefix reused", reused, claim_part)):
        seconds = timed_scoring(context, encoded, device, args.repeats)
        limit = peak / (2 * params * tokens)
        rate = len(texts) / seconds
        report.add(path=name, claims=len(texts), tokens_per_claim=round(tokens, 1), seconds=seconds,
                   claims_per_s=rate, flop_limit_claims_per_s=limit, share_of_limit=rate / limit)  # fmt: skip
    rates = {row["path"]: row["claims_per_s"] for row in report.rows}
    report.note(f"prefix reuse speed-up: {rates['prefix reused'] / rates['plain']:.2f}x")
    report.note(f"tokenization: {len(texts) / tokenize_s:,.0f} claims/s on one CPU thread (overlapped in a worker)")
    report.note(f"load from local disk to {device}: {loads[0]:.2f} s first, {loads[1]:.2f} s second (target <= 5 s)")

    def draw(axes, rows) -> None:
        names = [r["path"] for r in rows]
        axes.bar([i - 0.2 for i in range(len(rows))], [r["claims_per_s"] for r in rows], 0.4, label="measured")
        axes.bar([i + 0.2 for i in range(len(rows))], [r["flop_limit_claims_per_s"] for r in rows], 0.4,
                 label="FLOP limit", alpha=0.5)  # fmt: skip
        axes.set_xticks(range(len(rows)), names)
        axes.set_ylabel("claims/s")
        axes.set_yscale("log")
        axes.legend()

    report.finish(draw, f"Hot path: {args.size}, {context.dtype} on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
