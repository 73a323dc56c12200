"""Fidelity: the pipeline's verdicts and scores against a plain reference loop, with a real model.

    .venv/bin/python bench/fidelity.py                      # SmolLM2-135M-Instruct, 500 FEVER dev claims, fp32
    .venv/bin/python bench/fidelity.py --claims 100 --model DIR

Three ways to score every (claim, template) of the shipped templates (or ``--templates``):

1. **pipeline**: ``pervade run`` (broker, sink, workers as processes, batches, prefix KV reuse, coalescing),
   then the Parquet rows;
2. **reference**: ``tests/reference.py``, one prompt at a time, unpadded, no prefix cache, no batching;
3. **plain**: the engine with prefix reuse off (``score_claims(..., reuse_prefix=False)``), against the
   engine with it on (**prefix**), in this process.

Per template the table gives the pairs, the verdicts that differ and the largest score difference for
pipeline vs reference and for prefix vs plain. A verdict that differs where the two best labels are within
``--tolerance`` of each other is a tie broken by rounding and counted apart (``ties``); any other difference,
or a score further apart than ``--tolerance``, fails the run (exit 1).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.reference: the reference loop the tests check against

import msgspec  # noqa: E402
import torch  # noqa: E402
from benchkit import DEFAULT_OUT_DIR, Report  # noqa: E402

from pervade.context import ContextSpec  # noqa: E402
from pervade.gpuworker.engine import Scored, load_context, score_claims  # noqa: E402
from pervade.producer.claims import ClaimsSource, read_claims  # noqa: E402
from pervade.producer.templates import load_templates  # noqa: E402
from pervade.prompts import CONTENT_FREE_CLAIM, choose  # noqa: E402
from pervade.sinks.parquet import read_verdicts  # noqa: E402
from pervade.sinks.schema import SCORE_COLUMNS  # noqa: E402
from tests.reference import reference_scores  # noqa: E402

FEVER_DEV = ROOT.parent / "shared" / "data" / "fever" / "paper_dev.jsonl"


def compare(
    a: dict[str, tuple[str, list]], b: dict[str, tuple[str, list]], calibration: list | None, tolerance: float
) -> tuple[int, int, float]:
    """(verdicts that differ beyond a tie, ties broken the other way, largest score difference)."""
    differ = ties = 0
    largest = 0.0
    for key, (verdict, scores) in a.items():
        other_verdict, other_scores = b[key]
        if [x is None for x in scores] != [y is None for y in other_scores]:
            largest = float("inf")  # a label scored on one side only
        else:
            largest = max(largest, *(abs(x - y) for x, y in zip(scores, other_scores, strict=True) if x is not None))
        if verdict != other_verdict:
            margins = sorted(
                (s - (calibration[i] if calibration else 0.0) for i, s in enumerate(other_scores) if s is not None),
                reverse=True,
            )
            if margins[0] - margins[1] <= tolerance:
                ties += 1
            else:
                differ += 1
    return differ, ties, largest


def by_claim(claims: list, scored: Scored) -> dict[str, tuple[str, list]]:
    return {c.claim_id: (v, s) for c, v, s in zip(claims, scored.verdicts, scored.scores, strict=True)}


def run_pipeline(args: argparse.Namespace, out: Path, templates_file: Path | None) -> float:
    command = [sys.executable, "-m", "pervade", "run", "--claims", str(args.claims_file), "--limit", str(args.claims),
               "--model", str(args.model), "--dtype", "float32", "--workers", str(args.workers), "--out", str(out),
               "--overwrite", "--batch-size", str(args.batch_size)]  # fmt: skip
    if templates_file is not None:
        command += ["--templates", str(templates_file)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"pervade run failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model directory (default: SmolLM2-135M-Instruct, converted)")
    parser.add_argument("--claims", type=int, default=500)
    parser.add_argument("--claims-file", type=Path, default=FEVER_DEV)
    parser.add_argument("--templates", type=Path, help="templates file (default: the shipped set)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()
    if args.model is None:
        from pervade.smollm2 import ensure_smollm2

        args.model = ensure_smollm2()
    templates = load_templates(args.templates)
    claims = list(read_claims(ClaimsSource(str(args.claims_file), limit=args.claims)))
    texts = [c.text for c in claims]

    report = Report("fidelity", ["template", "pairs", "pipe_vs_ref_differ", "pipe_vs_ref_ties", "pipe_vs_ref_max",
                                 "prefix_vs_plain_differ", "prefix_vs_plain_ties", "prefix_vs_plain_max", "reference_s"],
                    out_dir=args.out_dir)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="pervade-fidelity-") as tmp:
        out = Path(tmp) / "out"
        wall = run_pipeline(args, out, args.templates)
        rows = read_verdicts(out).to_pylist()
    report.header(f"model {args.model}, fp32, {len(claims)} claims of {args.claims_file.name} x {len(templates)} "
                  f"templates; pipeline: pervade run, {args.workers} workers, batch {args.batch_size}: {wall:.1f} s; "
                  f"tolerance {args.tolerance}")  # fmt: skip
    pipeline: dict[str, dict[str, tuple[str, list]]] = {}
    for row in rows:
        pipeline.setdefault(row["template_id"], {})[row["claim_id"]] = (row["verdict"], [row[c] for c in SCORE_COLUMNS])
    if len(rows) != len(claims) * len(templates):
        sys.exit(f"the pipeline wrote {len(rows)} rows, not {len(claims) * len(templates)}")

    context = load_context(ContextSpec(model=str(args.model), dtype="float32"), torch.device("cpu"))
    failed = False
    for template_id, template in templates.items():
        started = time.perf_counter()
        calibration = reference_scores(context, template, CONTENT_FREE_CLAIM) if template.calibrate else None
        reference = {}
        for claim in claims:
            scores = reference_scores(context, template, claim.text)
            reference[claim.claim_id] = (choose(scores, calibration), scores)
        reference_s = time.perf_counter() - started
        prefix = score_claims(context, template, texts)
        plain = score_claims(context, template, texts, reuse_prefix=False)
        pipe = compare(pipeline[template_id], reference, calibration, args.tolerance)
        paths = compare(by_claim(claims, prefix), by_claim(claims, plain), plain.calibration, args.tolerance)
        report.add(template=template_id, pairs=len(claims), pipe_vs_ref_differ=pipe[0], pipe_vs_ref_ties=pipe[1],
                   pipe_vs_ref_max=f"{pipe[2]:.2e}", prefix_vs_plain_differ=paths[0], prefix_vs_plain_ties=paths[1],
                   prefix_vs_plain_max=f"{paths[2]:.2e}", reference_s=round(reference_s, 1))  # fmt: skip
        failed |= pipe[0] > 0 or paths[0] > 0 or pipe[2] > args.tolerance or paths[2] > args.tolerance
    report.note(f"templates: {msgspec.json.encode(list(templates)).decode()}")
    report.finish()
    print("FIDELITY " + ("FAILED" if failed else "OK"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
