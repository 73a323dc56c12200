"""Does anything hold an event loop? A real job (``pervade run``: broker, sink, workers, producer as processes)
runs with asyncio's debug mode on in every process, and every callback that held a loop for more than 100 ms
is listed, by process, with where it was created.

    python bench/loop_stalls.py                       # the shipped claims, the tiny model, 2 workers
    python bench/loop_stalls.py --model "$(pervade smollm2)"   # the real SmolLM2-135M-Instruct instead
    python bench/loop_stalls.py --claims ../shared/data/fever/paper_dev.jsonl --limit 2000 --context-mode partial

asyncio's debug mode (``PYTHONASYNCIODEBUG=1``, inherited by every process of the run) logs ``Executing
<callback> took N seconds`` for each callback or task step that ran longer than the loop's
``slow_callback_duration`` (100 ms by default: the threshold this check wants). The processes' logs are in
``OUT.logs/``; those lines go to stderr through the ``asyncio`` logger, beside pervade's JSON lines, and are
read back from there. Exit status 1 when any callback held a loop that long.

Debug mode costs time of its own (it records where each callback was created), and a 2-core machine shared
by several busy processes stretches everything: a stall listed here is a place to look, with its duration,
not yet a proof; a run that lists none is the claim this check supports.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

#: asyncio's own words for a slow callback (base_events.py, _run_once).
SLOW_CALLBACK = re.compile(r"Executing (?P<what>.+) took (?P<seconds>[0-9.]+) seconds")
#: A task's step: the coroutine, and where it paused once the slow step was over (the step ran up to there).
TASK_STEP = re.compile(r"coro=<(?P<coro>[\w.<>]+)\(\) running at (?P<where>\S+:\d+)>")
#: A plain callback: where it was created, as debug mode records it in the handle's repr.
CREATED_AT = re.compile(r"created at (?P<where>\S+:\d+)")


def run_job(args: argparse.Namespace, out_dir: Path) -> tuple[int, float, str]:
    """One ``pervade run`` with debug mode on in every process; its exit status, wall time and stderr."""
    env = {**os.environ, "PYTHONASYNCIODEBUG": "1"}
    command = [sys.executable, "-m", "pervade", "run", "--out", str(out_dir), "--workers", str(args.workers),
               "--context-mode", args.context_mode, "--threads-per-worker", "1", "--model", args.model]  # fmt: skip
    if args.claims:
        command += ["--claims", args.claims]
    if args.limit:
        command += ["--limit", str(args.limit)]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    return result.returncode, time.perf_counter() - started, result.stderr


def stalls_in(text: str) -> list[tuple[float, str]]:
    """Every slow callback asyncio logged in ``text``: (seconds, the task's coroutine and where it paused next,
    or where a plain callback was created)."""
    found = []
    for line in text.splitlines():
        match = SLOW_CALLBACK.search(line)
        if match is None:
            continue
        step, created = TASK_STEP.search(match["what"]), CREATED_AT.search(match["what"])
        if step is not None:
            where = f"{step['coro']}() until {step['where']}"
        else:
            where = created["where"] if created else match["what"][:120]
        found.append((float(match["seconds"]), where))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", default=None, help="claims file (default: the shipped sample)")
    parser.add_argument("--limit", type=int, default=None, help="claims to read (default: all)")
    parser.add_argument("--workers", type=int, default=2)
    # The tiny model by default (pervade run's own default is SmolLM2): the loops' stalls are the question, and a
    # small model keeps the run short and its results comparable with earlier ones.
    parser.add_argument("--model", default=None, help="model (default: the tiny model, built on first use)")
    parser.add_argument("--context-mode", default="full", choices=["full", "partial", "agnostic"])
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds the run may take")
    args = parser.parse_args()
    if args.model is None:
        from pervade.jobs.local import ensure_tiny_model

        args.model = str(ensure_tiny_model())

    out_dir = Path(tempfile.mkdtemp(prefix="pervade-loop-stalls-")) / "out"
    status, wall_s, run_stderr = run_job(args, out_dir)
    per_process: dict[str, list[tuple[float, str]]] = defaultdict(list)
    per_process["run (the launcher)"] = stalls_in(run_stderr)
    log_dir = out_dir.with_name(out_dir.name + ".logs")
    for log in sorted(log_dir.glob("*.log")):
        per_process[log.stem] = stalls_in(log.read_text(errors="replace"))

    print(f"pervade run: exit {status}, {wall_s:.1f} s, context mode {args.context_mode}, {args.workers} workers, "
          f"model {args.model}, claims {args.claims or 'shipped sample'} (limit {args.limit or 'none'}); logs in {log_dir}")  # fmt: skip
    print(f"\n{'process':<22} {'stalls >100 ms':>14} {'longest (ms)':>13}  the longest: what ran, and until where")
    total = 0
    for process, stalls in per_process.items():
        total += len(stalls)
        longest = max(stalls, default=(0.0, ""))
        print(f"{process:<22} {len(stalls):>14} {longest[0] * 1000:>13.0f}  {longest[1]}")
    for process, stalls in per_process.items():
        for seconds, where in sorted(stalls, reverse=True):
            print(f"  {process}: {seconds * 1000:.0f} ms  {where}")
    if status != 0:
        print(f"\nthe run failed (exit {status}):\n{run_stderr[-3000:]}")
        return 1
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
