"""Hostile cases: a black-box reproduction harness of the failures a hostile test found, judged against
pervade's promise.

    .venv/bin/python bench/hostile.py                      # every case
    .venv/bin/python bench/hostile.py --cases 1,7,9 --out /tmp/h.csv --keep

The promise (README, docs/reliability.md): ``pervade produce --wait`` exits 0 only when every (claim,
template) pair of what it submitted is written exactly once (one Parquet row) or recorded failed; every bad
input gets a clear one-line error (no traceback) naming what is wrong; nothing hangs.

Every case runs real processes on loopback, started as ``[sys.executable, "-m", "pervade", ROLE, ...]``
with cwd in a scratch directory and THIS script's tree root (``Path(__file__).resolve().parents[1]``) first
on PYTHONPATH, so the script measures whichever checkout it sits in: copy it into a ``git worktree`` of an
older commit to measure that commit. Each child's stderr (JSON lines) goes to ``logs/NAME.log`` and its
stdout to ``logs/NAME.out`` under ``/tmp/hostile-RUN/caseN/``. Every child has a timeout, every child is
stopped at the end of its case (also when the case fails), and a case that cannot be run is reported as an
``error`` row instead of stopping the script. Scratch directories are removed at the end unless ``--keep``.

The cases (the numbers of the hostile test), and when each ``holds``:

1. Same claims path, new content: ``produce --wait`` with 100 claims x 2 templates, then 40 claims appended
   to the same file, then the file replaced by 140 other claims; one broker and sink throughout. Holds if
   every run that exits 0 has every pair of the file's content at that time written exactly once under
   the job id it printed (an edited file may be a new job, with its own row for each of its pairs).
2. Damaged write-ahead log: 1,000 claims x 2 templates in batches of 2 (after an 8-claim warm-up job, so
   rows come while the producer still submits); once rows are written the broker is SIGKILLed, 4 KiB of
   random bytes overwrite the middle of the valid frames of ``STATE/broker.sqlite3-wal``, and the broker is
   started again on the same state and port. Holds if produce exits 0 with no pair missing or doubled, or
   non-zero with the number of missing pairs in its message.
3. As 2, but the broker is started again on a new empty ``--state`` (same port). Same judgement.
4. Two sinks on one output directory (``--roll-seconds 5``), 4,000 claims x 2 templates; one sink is
   SIGSTOPped for 8 s while both workers are SIGKILLed in turn and replaced. Holds if produce exits 0 with
   exactly one row per pair.
5. 500 claims x 2 templates with one good worker and one whose ``time.time()`` is 2e9 s behind. Holds if
   produce exits 0 with every pair exactly once within ``CLOCK_TIMEOUT_S``.
6. A second broker started on the live ``--state`` (another port) during a 2,000-pair run. Holds if it
   exits non-zero with a message about the state (directory in use, locked) and the job completes with
   every pair exactly once.
7. 2,000 claims whose record 1801 repeats record 1's id, with a ``sink --until-done``; then a good 100-claim
   job. Holds if the producer exits non-zero with no traceback and a message naming record 1801, nothing
   of the bad file was sent (no rows written from it, no open job in ``pervade status --json``), and the
   sink exits after the good job.
8. The sink's output directory inside a 2 MiB tmpfs (root only), filled up once the first file is written,
   watched for 25 s (a dead sink is restarted once, as an operator or systemd would), then freed (a dead
   sink is restarted again). Holds if no process printed a traceback, nothing but ``*.parquet`` ever
   appeared in OUT, ``polars.read_parquet(OUT)`` always worked, and every pair is there exactly once.
9. Bad inputs, one row each; each holds if it gets a non-zero exit, no traceback and a
   ``pervade ROLE: error: ...`` line: (a) the broker on a state whose ``broker.sqlite3`` is garbage;
   (b) a Latin-1 templates file (the message must be about the encoding); (c) a templates file with one id
   twice (the message must say so: "duplicate", "more than once", "twice" or "repeated"); (d) a claims
   JSONL whose line 1500 is not JSON (the message must name 1500, not record 1).
10. Two live workers with one ``--worker-id`` on a 2,000-pair run. Holds if the broker logs at most 4
    ``worker_joined`` (the second is refused or renamed) and produce exits 0 with every pair exactly once;
    also reports requeues and duplicate_results from the broker's last ``broker_stats``.

Columns: ``verdict`` is ``holds`` or ``BROKEN`` (judged as stated per case below), or ``error`` when the
harness itself could not run the case; ``exit`` the exit codes that matter (``None``: still running when
looked at, ``hung``: killed by the harness after its timeout); ``rows`` Parquet rows in the output;
``missing`` pairs of what was submitted neither written nor recorded failed; ``dup`` pairs written more
than once; ``tb`` the processes whose stderr held a Python ``Traceback``; ``error`` the first line of the
relevant error message; ``observed`` the details.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEVER_DEV = Path("/work/shared/data/fever/paper_dev.jsonl")
if not FEVER_DEV.exists():
    FEVER_DEV = ROOT.parent / "shared" / "data" / "fever" / "paper_dev.jsonl"
#: Fast heartbeats on every process: a dead peer is noticed in about a second.
HEARTBEAT = ("--heartbeat-interval", "0.25", "--heartbeat-liveness", "4")
#: Seconds a broker gets to write its endpoint file.
BROKER_START_S = 60.0
#: Seconds a SIGTERMed child gets before SIGKILL.
STOP_GRACE_S = 15.0
#: A worker whose time.time() runs 2e9 s behind (case 5).
SKEWED_CLOCK = (
    "import time,sys; _t=time.time; time.time=lambda: _t()-2e9; "
    "from pervade.cli import main; sys.exit(main(sys.argv[1:]))"
)
#: Case 5: the bound on a run with one skewed worker (a healthy run of its 1,000 pairs takes ~10 s).
CLOCK_TIMEOUT_S = 120
TRACEBACK = "Traceback (most recent call last)"
ERROR_LINE = re.compile(r"^pervade [\w-]+: (error|job failed)")


# --------------------------------------------------------------------------------------------- results


@dataclass
class Row:
    case: str
    name: str
    verdict: str = "error"
    seconds: float = 0.0
    exit: str = ""
    rows: str = ""
    missing: str = ""
    dup: str = ""
    tb: str = "-"
    error: str = ""
    observed: str = ""

    def note(self, text: str) -> None:
        self.observed = f"{self.observed}; {text}" if self.observed else text


COLUMNS = [("case", 4), ("name", 26), ("verdict", 7), ("secs", 5), ("exit", 34), ("rows", 6),
           ("missing", 9), ("dup", 7), ("tb", 20), ("error", 0)]  # fmt: skip


def format_table(rows: list[Row], error_width: int = 110) -> str:
    def cell(row: Row, name: str) -> str:
        return f"{row.seconds:.0f}" if name == "secs" else str(getattr(row, name))

    lines = [" | ".join(n.ljust(w) if w else n for n, w in COLUMNS)]
    lines.append("-+-".join("-" * (w or 5) for _, w in COLUMNS))
    for row in rows:
        cells = []
        for name, width in COLUMNS:
            text = cell(row, name).replace("\n", " ")
            if width:
                cells.append(text[:width].ljust(width))
            else:
                cells.append(text[:error_width] + ("..." if len(text) > error_width else ""))
        lines.append(" | ".join(cells))
    lines.append("")
    lines.append("observed:")
    for row in rows:
        lines.append(f"  {row.case:>3} {row.name}: {row.observed}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- processes


@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    log: Path
    out: Path
    started: float


class Procs:
    """The children of one case. Each is a process group leader (its own session), so a signal reaches
    whatever it started too; everything still running is stopped by ``close``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.logs = base / "logs"
        self.cwd = base / "cwd"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.children: dict[str, Child] = {}
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env.pop("PERVADE_KEYS", None)  # loopback, plain TCP
        self.env["HF_HUB_OFFLINE"] = "1"
        self.env["HF_DATASETS_OFFLINE"] = "1"
        self.env["HF_DATASETS_CACHE"] = str(base / "hf-datasets")
        self.env["TOKENIZERS_PARALLELISM"] = "false"

    def start(self, name: str, role: str, *args: str, code: str | None = None) -> Child:
        if name in self.children and self.alive(name):
            raise RuntimeError(f"{name} is already running")
        log, out = self.logs / f"{name}.log", self.logs / f"{name}.out"
        prefix = [sys.executable, "-c", code] if code else [sys.executable, "-m", "pervade"]
        with open(log, "ab") as err, open(out, "ab") as std:
            popen = subprocess.Popen(
                [*prefix, role, *args], cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=std,
                stderr=err, start_new_session=True,
            )  # fmt: skip
        child = self.children[name] = Child(name, popen, log, out, time.monotonic())
        return child

    def alive(self, name: str) -> bool:
        return name in self.children and self.children[name].popen.poll() is None

    def rc(self, name: str) -> int | None:
        return self.children[name].popen.poll() if name in self.children else None

    def status(self, name: str) -> str:
        """The exit status as text: ``running`` while alive, ``-`` if never started."""
        if name not in self.children:
            return "-"
        rc = self.children[name].popen.poll()
        return "running" if rc is None else str(rc)

    def wait(self, name: str, timeout: float) -> int | None:
        """The exit status, or None if still running after ``timeout`` seconds."""
        try:
            return self.children[name].popen.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return None

    def signal(self, name: str, sig: int) -> None:
        child = self.children.get(name)
        if child is None or child.popen.poll() is not None:
            return
        try:
            os.killpg(child.popen.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self, name: str) -> int | None:
        self.signal(name, signal.SIGKILL)
        return self.wait(name, 10)

    def stop(self, names: Iterable[str] | None = None, grace: float = STOP_GRACE_S) -> None:
        """SIGCONT (a stopped child), SIGTERM, then SIGKILL after ``grace`` seconds."""
        names = [n for n in (self.children if names is None else names) if self.alive(n)]
        for name in names:
            self.signal(name, signal.SIGCONT)
            self.signal(name, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name in names:
            if self.wait(name, deadline - time.monotonic()) is None:
                self.kill(name)

    def close(self) -> None:
        self.stop(grace=10)
        for child in self.children.values():  # whatever a group leader left behind
            try:
                os.killpg(child.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def stderr(self, name: str) -> str:
        child = self.children.get(name)
        path = child.log if child else self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stdout(self, name: str) -> str:
        path = self.logs / f"{name}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def events(self, name: str, event: str | None = None) -> list[dict]:
        records = []
        for line in self.stderr(name).splitlines():
            if line.startswith("{") and (event is None or event in line):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if event is None or record.get("event") == event:
                    records.append(record)
        return records

    def tracebacks(self) -> list[str]:
        return [name for name in self.children if TRACEBACK in self.stderr(name) + self.stdout(name)]

    def wait_event(self, name: str, event: str, timeout: float, count: int = 1) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.events(name, event)) >= count:
                return True
            if not self.alive(name):
                return len(self.events(name, event)) >= count
            time.sleep(0.2)
        return False


def first_error(text: str) -> str:
    """The first line of the error a process reported: ``pervade ROLE: error: ...``, else the exception
    line of a traceback, else the first error-level JSON event, else the last plain line."""
    lines = [line for line in text.splitlines() if line.strip()]
    plain = [line for line in lines if not line.lstrip().startswith("{")]
    for line in plain:
        if ERROR_LINE.match(line):
            return line.strip()
    if any(TRACEBACK in line for line in plain):
        for line in reversed(plain):
            if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b", line.strip()):
                return line.strip()
    for line in lines:
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("level") in ("error", "critical", "exception"):
                detail = record.get("error") or record.get("reason") or record.get("exception") or ""
                detail = str(detail).strip().splitlines()[-1] if str(detail).strip() else ""
                return f"[{record.get('event')}] {detail}".strip()
    return plain[-1].strip() if plain else ""


def plain_lines(text: str) -> list[str]:
    """What a process printed that is not a JSON log line."""
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("{")]


# -------------------------------------------------------------------------------------------- pervade


class Run:
    """One case's pervade processes: a broker, sinks, workers and producers, with fast heartbeats."""

    def __init__(self, base: Path, model: Path) -> None:
        self.base = base
        self.model = model
        self.procs = Procs(base)
        self.endpoint = ""
        self.out = base / "out"
        self.state = base / "state"
        self._rows_cache: dict[Path, int] = {}

    def start_broker(self, name: str = "broker", state: Path | None = None, bind: str | None = None,
                     wait: bool = True, *extra: str) -> str:  # fmt: skip
        """Start a broker; returns its endpoint (waits for the endpoint file unless ``wait`` is False)."""
        endpoint_file = self.base / f"{name}.endpoint"
        endpoint_file.unlink(missing_ok=True)
        state = state or self.state
        bind = bind or "tcp://127.0.0.1:*"
        self.procs.start(name, "broker", "--bind", bind, "--state", str(state), "--endpoint-file", str(endpoint_file),
                         *HEARTBEAT, *extra)  # fmt: skip
        if not wait:
            return ""
        deadline = time.monotonic() + BROKER_START_S
        while time.monotonic() < deadline:
            if endpoint_file.exists() and endpoint_file.read_text().strip():
                return endpoint_file.read_text().strip()
            if not self.procs.alive(name):
                raise RuntimeError(f"{name} exited with {self.procs.rc(name)}: {first_error(self.procs.stderr(name))}")
            time.sleep(0.05)
        raise RuntimeError(f"{name} wrote no endpoint within {BROKER_START_S} s")

    def broker(self, **kwargs) -> str:
        self.endpoint = self.start_broker(**kwargs)
        return self.endpoint

    def start_sink(self, name: str = "sink", out: Path | None = None, *extra: str, sink_id: str | None = None) -> None:
        out = out or self.out
        self.procs.start(name, "sink", "--broker", self.endpoint, "--out", str(out), "--sink-id", sink_id or name,
                         *HEARTBEAT, *extra)  # fmt: skip

    def start_worker(self, name: str, worker_id: str | None = None, code: str | None = None) -> None:
        args = ["--broker", self.endpoint, "--device", "cpu", "--threads", "1", "--worker-id", worker_id or name,
                "--cache-dir", str(self.base / "caches" / name), "--file-host", "127.0.0.1",
                "--file-bind-host", "127.0.0.1", *HEARTBEAT]  # fmt: skip
        self.procs.start(name, "worker", *args, code=code)

    def start_producer(self, name: str, claims: Path, templates: Path | None, batch_size: int, timeout_s: float,
                       *extra: str) -> None:  # fmt: skip
        args = ["--broker", self.endpoint, "--claims", str(claims), "--model", str(self.model),
                "--batch-size", str(batch_size), "--wait", "--timeout", str(timeout_s), *HEARTBEAT, *extra]  # fmt: skip
        if templates is not None:
            args += ["--templates", str(templates)]
        self.procs.start(name, "produce", *args)

    def produce(self, name: str, claims: Path, templates: Path | None, batch_size: int = 16, timeout_s: float = 120,
                *extra: str) -> str:  # fmt: skip
        """Run a producer to its end; its exit status as text (``hung`` if the harness had to kill it)."""
        self.start_producer(name, claims, templates, batch_size, timeout_s, *extra)
        return self.finish_producer(name, timeout_s)

    def finish_producer(self, name: str, timeout_s: float) -> str:
        child = self.procs.children[name]
        rc = self.procs.wait(name, timeout_s + 30 - (time.monotonic() - child.started))
        if rc is None:
            self.procs.kill(name)
            return "hung"
        return str(rc)

    def rows_now(self, out: Path | None = None) -> int:
        """Rows in the final Parquet files of ``out`` so far (each footer read once)."""
        import pyarrow.parquet as pq

        out = out or self.out
        total = 0
        for path in list(out.glob("*.parquet")) if out.exists() else []:
            if path not in self._rows_cache:
                try:
                    self._rows_cache[path] = pq.read_metadata(path).num_rows
                except Exception:  # noqa: BLE001, S112 - being written or removed: counted next time
                    continue
            total += self._rows_cache[path]
        return total

    def wait_rows(self, at_least: int, timeout: float, watch: str | None = None, out: Path | None = None) -> int:
        """Until the output holds ``at_least`` rows (or ``watch`` exits, or the timeout); the rows."""
        deadline = time.monotonic() + timeout
        rows = self.rows_now(out)
        while rows < at_least and time.monotonic() < deadline:
            if watch is not None and not self.procs.alive(watch):
                break
            time.sleep(0.1)
            rows = self.rows_now(out)
        return rows

    def status_json(self, timeout_s: float = 5) -> dict | None:
        """One ``pervade status --json`` snapshot (None if it gave none)."""
        name = f"status-{int(time.monotonic() * 1000)}"
        self.procs.start(name, "status", "--broker", self.endpoint, "--json", "--timeout", str(timeout_s))
        if self.procs.wait(name, timeout_s + 30) is None:
            self.procs.kill(name)
            return None
        try:
            return json.loads(self.procs.stdout(name))
        except json.JSONDecodeError:
            return None

    def close(self) -> None:
        self.procs.close()


# ------------------------------------------------------------------------------------------ the data


_FEVER: list[dict] | None = None


def fever() -> list[dict]:
    global _FEVER
    if _FEVER is None:
        records = []
        with open(FEVER_DEV, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                records.append({"id": r["id"], "claim": r["claim"], "label": r.get("label")})
        _FEVER = records
    return _FEVER


def write_claims(path: Path, records: list[dict], mode: str = "w") -> list[dict]:
    with open(path, mode, encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def default_templates() -> dict[str, str]:
    return json.loads((ROOT / "pervade" / "data" / "templates.json").read_text(encoding="utf-8"))


def write_templates(path: Path, count: int) -> list[str]:
    templates = dict(list(default_templates().items())[:count])
    path.write_text(json.dumps(templates, indent=1), encoding="utf-8")
    return list(templates)


def expected_pairs(records: list[dict], template_ids: list[str]) -> set[tuple[str, str]]:
    return {(str(r["id"]), t) for r in records for t in template_ids}


def write_sweep(run: Run, count: int) -> tuple[Path, Path, set[tuple[str, str]]]:
    """The first ``count`` FEVER claims and 2 templates as files in the case's directory: their paths, and
    every (claim, template) pair they make."""
    claims, templates = run.base / "claims.jsonl", run.base / "templates.json"
    return claims, templates, expected_pairs(write_claims(claims, fever()[:count]), write_templates(templates, 2))


def read_output(out: Path, job_id: str | None = None) -> Counter:
    """Rows per (claim_id, template_id) in the final Parquet files of ``out`` (pandas, file by file, so
    stray non-Parquet entries do not stop the count); only the rows of ``job_id`` when given."""
    import pandas as pd

    counts: Counter = Counter()
    for path in sorted(out.glob("*.parquet")) if out.exists() else []:
        df = pd.read_parquet(path, columns=["claim_id", "template_id", "job_id"])
        if job_id is not None:
            df = df[df["job_id"] == job_id]
        counts.update(zip(df["claim_id"].astype(str), df["template_id"].astype(str), strict=True))
    return counts


def read_failed(out: Path) -> set[tuple[str, str]]:
    directory = out.resolve().with_name(out.resolve().name + ".failures")
    failed = set()
    for path in sorted(directory.glob("*.jsonl")) if directory.exists() else []:
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "claim_id" in record and "template_id" in record:
                failed.add((str(record["claim_id"]), str(record["template_id"])))
    return failed


@dataclass
class Tally:
    rows: int  # rows of the expected pairs
    missing: int
    dup: int  # pairs with more than one row
    extra_rows: int  # rows beyond one per pair
    failed: int

    @property
    def exact(self) -> bool:
        return self.missing == 0 and self.dup == 0


def tally(out: Path, expected: set[tuple[str, str]], job_id: str | None = None) -> Tally:
    counts = read_output(out, job_id)
    failed = read_failed(out) & expected
    rows = sum(n for pair, n in counts.items() if pair in expected)
    missing = sum(1 for pair in expected if counts.get(pair, 0) == 0 and pair not in failed)
    dup = sum(1 for pair in expected if counts.get(pair, 0) > 1)
    extra = sum(n - 1 for pair, n in counts.items() if pair in expected and n > 1)
    return Tally(rows=rows, missing=missing, dup=dup, extra_rows=extra, failed=len(failed))


def count_in(message: str, number: int) -> bool:
    return re.search(rf"(?<![\d.]){number}(?![\d.])", message.replace(",", "")) is not None


def judge_lossy_run(row: Row, rc: str, t: Tally, message: str) -> None:
    """Cases 2 and 3: holds if exit 0 with every pair exactly once, or non-zero with the count of the
    missing pairs in the message (or with none missing or doubled); BROKEN if exit 0 with pairs missing
    (or doubled), a hang (the producer's --timeout), or a non-zero exit without that count."""
    if rc == "0":
        row.verdict = "holds" if t.exact else "BROKEN"
    elif rc == "hung" or "not finished within" in message:
        row.verdict = "BROKEN"
        row.note("the producer stalled until its timeout")
    elif t.missing == 0:
        row.verdict = "holds" if t.dup == 0 else "BROKEN"
        row.note("non-zero exit although no pair is missing")
    else:
        named = count_in(message, t.missing)
        row.verdict = "holds" if named else "BROKEN"
        row.note(f"non-zero exit {'names' if named else 'does not name'} the {t.missing} missing pairs")


# ---------------------------------------------------------------------------------------------- cases


@dataclass
class Env:
    base: Path
    tiny: Path
    small: Path


def case1(env: Env, row: Row, run: Run) -> None:
    """Same claims path, new content."""
    claims, templates = run.base / "claims.jsonl", run.base / "templates.json"
    tids = write_templates(templates, 2)
    data = fever()
    run.broker()
    run.start_sink()
    run.start_worker("worker-0")
    run.start_worker("worker-1")
    content = write_claims(claims, data[:100])
    results = []
    steps = [("100 claims", None), ("+40 appended", data[100:140]), ("140 different", data[200:340])]
    for i, (label, change) in enumerate(steps):
        if i == 1:
            content = content + write_claims(claims, change, mode="a")
        elif i == 2:
            content = write_claims(claims, change)
        rc = run.produce(f"producer-{i + 1}", claims, templates, batch_size=16, timeout_s=90)
        time.sleep(1.0)  # a late file of a run that returned too early
        # Judged per job: an edited file may be a new job, which writes its own row for each of its pairs
        # (pairs it shares with an earlier job included, told apart by job_id).
        job = re.search(r"^job (job-[0-9a-f]+): ", run.procs.stdout(f"producer-{i + 1}"), re.MULTILINE)
        t = tally(run.out, expected_pairs(content, tids), job.group(1) if job else None)
        message = first_error(run.procs.stderr(f"producer-{i + 1}"))
        results.append((label, rc, t, message))
        row.note(f"run {i + 1} ({label}): exit {rc}, {t.rows}/{len(content) * 2} rows of its pairs, "
                 f"missing {t.missing}, dup {t.dup}" + (f", said {message!r}" if rc != "0" else ""))  # fmt: skip
    row.exit = ",".join(rc for _, rc, _, _ in results)
    row.rows = str(sum(read_output(run.out).values()))
    row.missing = ",".join(str(t.missing) for _, _, t, _ in results)
    row.dup = ",".join(str(t.dup) for _, _, t, _ in results)
    row.error = next((m for _, rc, _, m in results if rc != "0" and m), "")
    broken = [label for label, rc, t, _ in results if rc == "0" and not t.exact]
    broken += [f"{label} (traceback)" for i, (label, rc, _, _) in enumerate(results)
               if rc != "0" and TRACEBACK in run.procs.stderr(f"producer-{i + 1}")]  # fmt: skip
    broken += [f"{label} (hung)" for label, rc, _, _ in results if rc == "hung"]
    row.verdict = "BROKEN" if broken else "holds"
    if broken:
        row.note("exit 0 with pairs missing or doubled, or an unclear or hung run: " + ", ".join(broken))


def wal_frames(wal: Path) -> tuple[int, int, int, int]:
    """(file size, page size, valid frames, end of the valid frames) of a SQLite write-ahead log. Valid
    frames are the leading frames carrying the header's salts: those written since the log last started
    again (after a complete checkpoint, SQLite reuses the file from its beginning with new salts)."""
    try:
        data = wal.read_bytes()
    except FileNotFoundError:
        return 0, 0, 0, 0
    if len(data) < 32:
        return len(data), 0, 0, 0
    _, _, page_size, _, salt1, salt2, _, _ = struct.unpack(">8I", data[:32])
    frame = 24 + page_size
    offset, frames = 32, 0
    while offset + frame <= len(data):
        _, _, s1, s2 = struct.unpack(">4I", data[offset : offset + 16])
        if (s1, s2) != (salt1, salt2):
            break
        frames += 1
        offset += frame
    return len(data), page_size, frames, offset


def damage_wal(wal: Path, seed: int = 2) -> str:
    """Overwrite 4 KiB of random bytes at the middle of the WAL's valid frames. Returns what was done."""
    size, page_size, frames, offset = wal_frames(wal)
    if frames >= 8:
        middle = 32 + (offset - 32) // 2
    elif size >= 3 * 4096:  # few current frames: the middle of the file, as the hostile test did
        middle = size // 2
    else:
        raise RuntimeError(f"{wal}: {size} B, {frames} valid frames: nothing to damage")
    noise = random.Random(seed).randbytes(4096)
    with open(wal, "r+b") as f:
        f.seek(middle)
        f.write(noise)
        f.flush()
        os.fsync(f.fileno())
    return f"WAL {size} B, {frames} valid frames of {page_size} B, 4096 random bytes written at offset {middle}"


def restart_run(env: Env, row: Row, run: Run, new_state: bool) -> None:
    """Cases 2 and 3: a broker killed mid-run and started again on a damaged or an empty state."""
    claims, templates, expected = write_sweep(run, 1000)
    endpoint = run.broker()
    run.start_sink("sink", None, "--roll-seconds", "0.5", "--idle-roll-seconds", "0.2")
    run.start_worker("worker-0")
    run.start_worker("worker-1")
    # A small warm-up job first (other claims), so the workers hold the model; then 1,000 batches of 2
    # claims: rows come while the producer is still submitting, and the broker dies with submissions in
    # its log that no checkpoint has copied yet.
    warmup = run.base / "claims-warmup.jsonl"
    write_claims(warmup, fever()[9000:9008])
    rc = run.produce("producer-warmup", warmup, templates, batch_size=2, timeout_s=90)
    if rc != "0":
        raise RuntimeError(f"the warm-up job failed ({rc}): {first_error(run.procs.stderr('producer-warmup'))}")
    time.sleep(1.0)
    warm_rows = run.rows_now()
    run.start_producer("producer", claims, templates, 2, 90)
    started = time.monotonic()
    wal = run.state / "broker.sqlite3-wal"
    # Some rows written, and a log long enough that its middle is real frames.
    deadline, rows_seen = time.monotonic() + 90, None
    while time.monotonic() < deadline and run.procs.alive("producer"):
        if run.rows_now() > warm_rows:
            rows_seen = rows_seen or time.monotonic()
            if new_state or wal_frames(wal)[2] >= 64 or time.monotonic() - rows_seen > 5:
                break
        time.sleep(0.02)
    rows_before = run.rows_now() - warm_rows
    if not run.procs.alive("producer"):
        raise RuntimeError(f"the producer ended (exit {run.procs.rc('producer')}) before the broker could be killed")
    submitting = not run.procs.events("producer", "job_submitted")
    run.procs.kill("broker")
    row.note(f"broker SIGKILLed at {time.monotonic() - started:.1f} s with {rows_before}/{len(expected)} rows written, "
             f"{'while the producer was still submitting' if submitting else 'after the submission'}")  # fmt: skip
    if new_state:
        state = run.base / "state-new"
        row.note("restarted on a new empty --state, same port")
    else:
        state = run.state
        row.note(damage_wal(wal))
    try:
        run.start_broker(name="broker-2", state=state, bind=endpoint)
        row.note("restarted broker is up")
    except RuntimeError as exc:
        row.note(f"restarted broker failed: {exc}")
    rc = run.finish_producer("producer", 90)
    message = first_error(run.procs.stderr("producer"))
    time.sleep(1.0)
    run.procs.stop(["sink"])
    t = tally(run.out, expected)
    row.exit = f"produce={rc} broker2={run.procs.status('broker-2')}"
    row.rows, row.missing, row.dup = str(t.rows), str(t.missing), str(t.dup)
    row.error = message if rc != "0" else first_error(run.procs.stderr("broker-2"))
    row.note(f"produce exit {rc} after {time.monotonic() - started:.0f} s; {t.rows} rows, missing {t.missing}, "
             f"dup {t.dup}, failed {t.failed}" + (f"; producer said {message!r}" if rc != "0" else ""))  # fmt: skip
    b2 = first_error(run.procs.stderr("broker-2"))
    if b2:
        row.note(f"broker-2 said {b2!r}")
    judge_lossy_run(row, rc, t, message)


def case2(env: Env, row: Row, run: Run) -> None:
    restart_run(env, row, run, new_state=False)


def case3(env: Env, row: Row, run: Run) -> None:
    restart_run(env, row, run, new_state=True)


def case4(env: Env, row: Row, run: Run) -> None:
    """Two sinks on one directory, one SIGSTOPped for 8 s, while workers are SIGKILLed and replaced."""
    # Long enough (8,000 pairs on the small model) that results still flow when the sink is stopped, on an
    # idle machine too.
    claims, templates, expected = write_sweep(run, 4000)
    run.broker()
    # A longer roll interval than the default keeps the stalled sink's unfinished file open wider.
    roll = ("--roll-seconds", "5")
    run.start_sink("sink-a", None, *roll)
    run.start_sink("sink-b", None, *roll)
    run.start_worker("worker-0")
    run.start_worker("worker-1")
    started = time.monotonic()
    run.start_producer("producer", claims, templates, 8, 150)
    run.wait_rows(400, 60, watch="producer")
    # Stop sink-b 1 s after one of its files is closed, while results flow: its next file is open then,
    # holding deliveries it has not acknowledged (the broker's sink_left says how many).
    files = len(run.procs.events("sink-b", "file_written"))
    deadline = time.monotonic() + 30
    while len(run.procs.events("sink-b", "file_written")) == files and time.monotonic() < deadline:
        if not run.procs.alive("producer"):
            break
        time.sleep(0.05)
    time.sleep(1.0)
    if not run.procs.alive("producer"):
        raise RuntimeError("the producer ended before the sink could be stopped")
    run.procs.signal("sink-b", signal.SIGSTOP)
    stopped_at = time.monotonic()
    row.note(f"sink-b SIGSTOPped at {stopped_at - started:.1f} s ({run.rows_now()} rows written)")
    time.sleep(1.5)  # results keep flowing while the broker notices the stalled sink
    run.procs.kill("worker-0")
    run.start_worker("worker-2")
    time.sleep(3.0)
    run.procs.kill("worker-1")
    run.start_worker("worker-3")
    time.sleep(max(0.0, 8.0 - (time.monotonic() - stopped_at)))
    run.procs.signal("sink-b", signal.SIGCONT)
    left = [e.get("unacked") for e in run.procs.events("broker", "sink_left") if e.get("sink_id") == "sink-b"]
    row.note(f"broker: sink-b left with {left} unacknowledged deliveries")
    row.note("worker-0 (1.5 s after) and worker-1 (4.5 s after) SIGKILLed, worker-2 and worker-3 started; "
             "sink-b SIGCONTed after 8 s")  # fmt: skip
    rc = run.finish_producer("producer", 150)
    message = first_error(run.procs.stderr("producer"))
    time.sleep(3.0)  # the stalled sink's late file
    sinks = {name: run.procs.status(name) for name in ("sink-a", "sink-b")}
    run.procs.stop(["sink-a", "sink-b"])
    t = tally(run.out, expected)
    row.exit = f"produce={rc} " + " ".join(f"{n}={v}" for n, v in sinks.items())
    row.rows, row.missing, row.dup = str(t.rows), str(t.missing), str(t.dup)
    row.error = message if rc != "0" else ""
    a, b = (sum(e.get("rows", 0) for e in run.procs.events(s, "file_written")) for s in ("sink-a", "sink-b"))
    row.note(f"produce exit {rc}; rows by sink-a {a}, sink-b {b}; {t.extra_rows} rows beyond one per pair, "
             f"missing {t.missing}, failed {t.failed}")  # fmt: skip
    row.verdict = "holds" if t.exact and rc == "0" else "BROKEN"
    if row.verdict == "holds" and not any(left):
        row.verdict = "error"
        row.note("not exercised: the stopped sink held no unacknowledged delivery (the run was too quick)")


def case5(env: Env, row: Row, run: Run) -> None:
    """A worker whose clock is 2e9 s behind."""
    claims, templates, expected = write_sweep(run, 500)
    run.broker()
    run.start_sink()
    run.start_worker("worker-skewed", code=SKEWED_CLOCK)
    run.start_worker("worker-good")
    started = time.monotonic()
    rc = run.produce("producer", claims, templates, batch_size=16, timeout_s=CLOCK_TIMEOUT_S)
    seconds = time.monotonic() - started
    message = first_error(run.procs.stderr("producer"))
    time.sleep(1.0)
    t = tally(run.out, expected)
    row.exit = f"produce={rc} skewed={run.procs.status('worker-skewed')}"
    row.rows, row.missing, row.dup = str(t.rows), str(t.missing), str(t.dup)
    row.error = message if rc != "0" else first_error(run.procs.stderr("worker-skewed"))
    counts = read_output_by_worker(run.out)
    joined = [e.get("worker_id") for e in run.procs.events("broker", "worker_joined")]
    dead = len(run.procs.events("broker", "worker_declared_dead"))
    row.note(f"produce exit {rc} after {seconds:.0f} s (timeout {CLOCK_TIMEOUT_S}); rows per worker {dict(counts)}; "
             f"worker_joined {dict(Counter(joined))}; declared dead {dead}")  # fmt: skip
    skew = first_error(run.procs.stderr("worker-skewed"))
    if skew:
        row.note(f"skewed worker said {skew!r}")
    row.verdict = "holds" if rc == "0" and t.exact and seconds <= CLOCK_TIMEOUT_S else "BROKEN"


def read_output_by_worker(out: Path) -> Counter:
    import pandas as pd

    counts: Counter = Counter()
    for path in sorted(out.glob("*.parquet")) if out.exists() else []:
        counts.update(pd.read_parquet(path, columns=["worker_id"])["worker_id"].astype(str))
    return counts


def case6(env: Env, row: Row, run: Run) -> None:
    """A second broker on a live --state directory."""
    claims, templates, expected = write_sweep(run, 1000)
    run.broker()
    run.start_sink()
    run.start_worker("worker-0")
    run.start_worker("worker-1")
    run.start_producer("producer", claims, templates, 8, 60)
    run.wait_rows(200, 60, watch="producer")
    if not run.procs.alive("producer"):
        raise RuntimeError("the producer ended before the second broker could be started")
    run.start_broker(name="broker-2", state=run.state, wait=False)
    rc2 = run.procs.wait("broker-2", 15)
    said = first_error(run.procs.stderr("broker-2"))
    if rc2 is None:
        row.note("the second broker was still running 15 s after its start (did not refuse): SIGTERMed")
        run.procs.stop(["broker-2"])
        refused = False
    else:
        refused = rc2 != 0
        row.note(f"the second broker exited {rc2}")
    lines = plain_lines(run.procs.stderr("broker-2"))
    opened = run.procs.events("broker-2", "broker_state_opened")
    if opened:
        jobs, queued = opened[0].get("jobs"), opened[0].get("queued")
        row.note(f"broker-2 logged broker_state_opened (jobs={jobs}, queued={queued})")
    rc = run.finish_producer("producer", 60)
    message = first_error(run.procs.stderr("producer"))
    time.sleep(1.0)
    run.procs.stop(["sink", "broker"])
    stats = run.procs.events("broker", "broker_stats")
    if stats:
        row.note(f"first broker's last counts: queued {stats[-1].get('queued')}, batches {stats[-1].get('batches')}")
    t = tally(run.out, expected)
    row.exit = f"produce={rc} broker2={rc2 if rc2 is not None else 'kept-running'}"
    row.rows, row.missing, row.dup = str(t.rows), str(t.missing), str(t.dup)
    row.error = said or (lines[0] if lines else "") or (message if rc != "0" else "")
    row.note(f"broker-2 printed {lines[:2]!r}" if lines else "broker-2 printed no plain line")
    row.note(f"produce exit {rc}" + (f" ({message!r})" if rc != "0" else "") + f"; missing {t.missing}, dup {t.dup}")
    about_state = bool(re.search(r"state|lock|in use|already", said, re.IGNORECASE))
    row.verdict = "holds" if refused and about_state and rc == "0" and t.exact else "BROKEN"


def case7(env: Env, row: Row, run: Run) -> None:
    """A claims file whose record 1801 repeats an earlier id, with a sink --until-done."""
    bad, good, templates = run.base / "claims-bad.jsonl", run.base / "claims-good.jsonl", run.base / "templates.json"
    tids = write_templates(templates, 2)
    records = [dict(r) for r in fever()[:2000]]
    records[1800]["id"] = records[0]["id"]  # record 1801 (1-based) repeats record 1's id
    write_claims(bad, records)
    good_records = write_claims(good, fever()[5000:5100])
    bad_ids = {str(r["id"]) for r in records}
    run.broker()
    run.start_sink("sink", None, "--until-done")
    run.start_worker("worker-0")
    rc = run.produce("producer-bad", bad, templates, batch_size=32, timeout_s=90)
    message = first_error(run.procs.stderr("producer-bad"))
    tb = TRACEBACK in run.procs.stderr("producer-bad")
    status = run.status_json()
    open_jobs = []
    if status is not None:
        for job in status.get("jobs", []):
            if not job.get("done"):
                open_jobs.append(f"{job.get('job_id')}: {job.get('batches')} batches, ended={job.get('ended')}")
        listed = len(status.get("jobs", []))
        row.note(f"after the bad producer: broker lists {listed} jobs, open: {open_jobs or 'none'}")
    else:
        row.note("pervade status --json gave no snapshot")
    time.sleep(8.0)  # what was sent gets computed and written
    bad_rows = sum(n for (cid, _), n in read_output(run.out).items() if cid in bad_ids)
    rc_good = run.produce("producer-good", good, templates, batch_size=32, timeout_s=90)
    sink_rc = run.procs.wait("sink", 20)
    t = tally(run.out, expected_pairs(good_records, tids))
    row.exit = f"bad={rc} good={rc_good} sink={sink_rc if sink_rc is not None else 'running'}"
    row.rows = str(sum(read_output(run.out).values()))
    row.missing, row.dup = str(t.missing), str(t.dup)
    row.error = message
    sink_end = f"exited {sink_rc}" if sink_rc is not None else "still running 20 s after the good job (open job)"
    row.note(f"bad producer exit {rc}; rows from the bad file written {bad_rows}; good job exit {rc_good}, "
             f"missing {t.missing}; sink --until-done {sink_end}")  # fmt: skip
    names = count_in(message, 1801)
    before_sending = bad_rows == 0 and not open_jobs
    refused = rc not in ("0", "hung") and names and not tb
    row.verdict = "holds" if refused and before_sending and sink_rc is not None else "BROKEN"


def case8(env: Env, row: Row, run: Run) -> None:
    """The sink on a full disk: a 2 MiB tmpfs holding the output directory, filled up once the sink's first
    file is written, so its next writes hit ENOSPC."""
    if os.geteuid() != 0:
        raise RuntimeError("needs root to mount a tmpfs")
    claims, templates, expected = write_sweep(run, 1500)
    mnt = run.base / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True, capture_output=True)
    out = mnt / "out"
    strays: Counter = Counter()
    polars_failures: Counter = Counter()
    polars_reads = [0]
    sinks: list[str] = []
    last_polars = [0.0]

    def sample() -> None:
        try:
            entries = os.listdir(out)
        except FileNotFoundError:
            return
        for entry in entries:
            if not entry.endswith(".parquet"):
                strays[entry] += 1
        if time.monotonic() - last_polars[0] >= 1.0 and any(e.endswith(".parquet") for e in entries):
            last_polars[0] = time.monotonic()
            try_polars()

    def try_polars() -> None:
        import polars as pl

        polars_reads[0] += 1
        try:
            pl.read_parquet(str(out))
        except Exception as exc:  # noqa: BLE001 - whatever polars raises is the observation
            polars_failures[f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"] += 1

    def start_sink() -> None:
        name = "sink" if not sinks else f"sink-restart{len(sinks)}"
        run.start_sink(name, out, sink_id="sink")  # the operator's same command, same sink id
        sinks.append(name)

    def watch(seconds: float, restart: bool, label: str) -> None:
        """Sample OUT for ``seconds`` (or until the producer ends); restart a dead sink once if asked."""
        deadline = time.monotonic() + seconds
        noted: set[str] = set()
        while time.monotonic() < deadline and run.procs.alive("producer"):
            sample()
            if not run.procs.alive(sinks[-1]) and sinks[-1] not in noted:
                noted.add(sinks[-1])
                row.note(f"{sinks[-1]} died ({label}), exit {run.procs.rc(sinks[-1])}: "
                         f"{first_error(run.procs.stderr(sinks[-1]))[:100]!r}")  # fmt: skip
                if restart:
                    start_sink()
                    row.note(f"restarted as {sinks[-1]} ({label})")
                    restart = False
            time.sleep(0.1)

    try:
        run.broker()
        start_sink()
        run.start_worker("worker-0")
        run.start_worker("worker-1")
        run.procs.wait_event("sink", "sink_started", 60)
        out.mkdir(exist_ok=True)
        started = time.monotonic()
        run.start_producer("producer", claims, templates, 16, 100)
        first = run.wait_rows(1, 60, watch="producer", out=out)
        filler = mnt / "filler"
        with open(filler, "wb") as f:  # every byte left
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        row.note(
            f"tmpfs (2 MiB) filled to {shutil.disk_usage(mnt).free} B free once the first file was written "
            f"({first}/{len(expected)} rows, {time.monotonic() - started:.1f} s after the producer started)"
        )
        watch(25, restart=True, label="disk full")  # an operator (or systemd) restarts a dead sink once
        row.note(f"after {time.monotonic() - started:.0f} s on a full disk: {run.rows_now(out)} rows in final files, "
                 f"{sinks[-1]} {'alive' if run.procs.alive(sinks[-1]) else 'dead'}")  # fmt: skip
        filler.unlink()
        row.note("filler deleted")
        if not run.procs.alive(sinks[-1]):
            start_sink()
            row.note(f"restarted as {sinks[-1]} (space freed)")
        watch(100, restart=True, label="space freed")
        rc = run.finish_producer("producer", 100)
        message = first_error(run.procs.stderr("producer"))
        time.sleep(1.0)
        sample()
        run.procs.stop(sinks)
        sample()
        if any(out.glob("*.parquet")):
            try_polars()
        t = tally(out, expected)
        sink_logs = {name: run.procs.stderr(name) for name in sinks}
        sink_error = next((first_error(text) for text in sink_logs.values() if first_error(text)), "")
        row.exit = f"produce={rc} " + " ".join(f"{n}={run.procs.status(n)}" for n in sinks)
        row.rows, row.missing, row.dup = str(t.rows), str(t.missing), str(t.dup)
        row.error = sink_error or message
        row.note(f"produce exit {rc} after {time.monotonic() - started:.0f} s; missing {t.missing}, dup {t.dup}")
        seen = ", ".join(f"{k} (seen {v}x)" for k, v in strays.most_common(6))
        row.note(f"in OUT besides *.parquet: {seen or 'nothing'}")
        failures = sum(polars_failures.values())
        row.note(f"polars.read_parquet(OUT) failed {failures} of {polars_reads[0]} reads"
                 + (f" ({polars_failures.most_common(1)[0][0]})" if failures else ""))  # fmt: skip
        beside = []
        for path in sorted(mnt.iterdir()):
            if path.name not in ("out", "filler"):
                inside = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
                beside.append(f"{path.name}{'/' if path.is_dir() else ''}" + (f" {inside[:3]}" if inside else ""))
        row.note(f"beside OUT in the tmpfs at the end: {beside or 'nothing'}")
        tracebacks = [n for n, text in sink_logs.items() if TRACEBACK in text]
        row.note(f"sink tracebacks: {tracebacks or 'none'}")
        clean = not strays and failures == 0
        row.verdict = "holds" if not run.procs.tracebacks() and clean and t.exact and rc == "0" else "BROKEN"
    finally:
        run.close()
        if subprocess.run(["umount", str(mnt)], check=False, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def bad_input(row: Row, run: Run, name: str, must: Callable[[str], bool] | None, what: str) -> None:
    """Judge one bad-input process: non-zero exit, no traceback, a one-line error (and ``must``)."""
    text = run.procs.stderr(name) + run.procs.stdout(name)
    rc = run.procs.rc(name)
    message = first_error(text)
    tb = TRACEBACK in text
    lines = plain_lines(run.procs.stderr(name))
    row.exit = str(rc) if rc is not None else "hung"
    row.tb = name if tb else "-"
    row.error = message
    row.note(f"exit {row.exit}; {len(lines)} plain stderr lines; traceback {'yes' if tb else 'no'}")
    ok = rc not in (None, 0) and not tb and bool(ERROR_LINE.match(message)) and (must is None or must(message))
    if not ok and must is not None and not must(message):
        row.note(f"message does not {what}")
    row.verdict = "holds" if ok else "BROKEN"


def case9(env: Env, rows: dict[str, Row], run: Run) -> None:
    # (a) garbage broker.sqlite3
    row = rows["9a"]
    started = time.monotonic()
    state = run.base / "state-garbage"
    state.mkdir()
    (state / "broker.sqlite3").write_bytes(random.Random(9).randbytes(65536))
    run.start_broker(name="broker-garbage", state=state, wait=False)
    if run.procs.wait("broker-garbage", 30) is None:
        row.note("the broker was still running 30 s after its start on a garbage state: killed")
        run.procs.kill("broker-garbage")
        row.exit = "kept-running"
        row.verdict = "BROKEN"
        row.error = first_error(run.procs.stderr("broker-garbage"))
    else:
        bad_input(row, run, "broker-garbage", None, "")
    row.seconds = time.monotonic() - started

    # A live broker, sink and worker for the producers, should any get as far as sending.
    run.broker()
    run.start_sink()
    run.start_worker("worker-0")
    claims = run.base / "claims.jsonl"
    write_claims(claims, fever()[:50])

    # (b) a templates file in Latin-1
    row = rows["9b"]
    started = time.monotonic()
    latin = run.base / "templates-latin1.json"
    latin.write_bytes('{"t_latin": "Vérifie cette affirmation: {claim}\\nRéponse:"}'.encode("latin-1"))
    run.produce("producer-latin1", claims, latin, batch_size=16, timeout_s=30)
    bad_input(row, run, "producer-latin1", lambda m: bool(re.search(r"utf-?8|encod|decod|latin", m, re.IGNORECASE)),
              "say what is wrong with the encoding")  # fmt: skip
    row.seconds = time.monotonic() - started

    # (c) a duplicate template id
    row = rows["9c"]
    started = time.monotonic()
    dup = run.base / "templates-dup.json"
    text = '{"direct": "Claim: {claim}\\nAnswer:",\n "direct": "Is it true? {claim}\\nAnswer:"}\n'
    dup.write_text(text, encoding="utf-8")
    run.produce("producer-dupkey", claims, dup, batch_size=16, timeout_s=30)
    says_duplicate = re.compile(r"duplicat|more than once|twice|repeated", re.IGNORECASE)
    bad_input(row, run, "producer-dupkey", lambda m: bool(says_duplicate.search(m)), "say the id is duplicated")
    if run.procs.rc("producer-dupkey") == 0:
        row.note("the producer accepted the file (one of the two templates silently dropped)")
    row.seconds = time.monotonic() - started

    # (d) claims JSONL whose line 1500 is not valid JSON
    row = rows["9d"]
    started = time.monotonic()
    broken = run.base / "claims-badline.jsonl"
    lines = [json.dumps(r) for r in fever()[:2000]]
    lines[1499] = lines[1499][: len(lines[1499]) // 2]  # line 1500 cut in half
    broken.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run.produce("producer-badline", broken, None, batch_size=16, timeout_s=60)
    bad_input(row, run, "producer-badline",
              lambda m: count_in(m, 1500) and not re.search(r"record 1\b", m), "name line/record 1500")  # fmt: skip
    row.seconds = time.monotonic() - started


def case10(env: Env, row: Row, run: Run) -> None:
    """Two live workers with one --worker-id."""
    claims, templates, expected = write_sweep(run, 1000)
    run.broker()
    run.start_sink()
    run.start_worker("worker-a", worker_id="twin")
    run.start_worker("worker-b", worker_id="twin")
    started = time.monotonic()
    rc = run.produce("producer", claims, templates, batch_size=16, timeout_s=100)
    wall = time.monotonic() - started
    message = first_error(run.procs.stderr("producer"))
    time.sleep(1.0)
    for worker in ("worker-a", "worker-b"):  # a refused worker: give it time to exit
        if run.procs.events(worker, "worker_stopped") and run.procs.wait(worker, 10) is None:
            row.note(f"{worker} logged worker_stopped but was still running 10 s later")
    worker_rcs = {w: run.procs.status(w) for w in ("worker-a", "worker-b")}
    run.procs.stop(["sink", "worker-a", "worker-b", "broker"])
    t = tally(run.out, expected)
    joined = run.procs.events("broker", "worker_joined")
    stats = run.procs.events("broker", "broker_stats")
    last = stats[-1] if stats else {}
    row.exit = f"produce={rc} a={worker_rcs['worker-a']} b={worker_rcs['worker-b']}"
    row.rows, row.missing, row.dup = str(t.rows), str(t.missing), str(t.dup)
    worker_error = first_error(run.procs.stderr("worker-b")) or first_error(run.procs.stderr("worker-a"))
    row.error = message if rc != "0" else worker_error
    ids = Counter(e.get("worker_id") for e in joined)
    row.note(
        f"produce exit {rc}, wall {wall:.0f} s; worker_joined {len(joined)} ({dict(ids)}); "
        f"requeues {last.get('requeues')}, duplicate_results {last.get('duplicate_results')}, "
        f"unknown_peer_messages {last.get('unknown_peer_messages')}; missing {t.missing}, dup {t.dup}"
    )
    row.verdict = "holds" if len(joined) <= 4 and rc == "0" and t.exact else "BROKEN"


CASES: dict[int, tuple[str, Callable]] = {
    1: ("same path, new content", case1),
    2: ("damaged WAL", case2),
    3: ("restart on empty state", case3),
    4: ("two sinks, one stalled", case4),
    5: ("worker clock -2e9 s", case5),
    6: ("2nd broker on live state", case6),
    7: ("bad record 1801", case7),
    8: ("sink on a full disk", case8),
    9: ("bad inputs", case9),
    10: ("two workers, one id", case10),
}
#: Cases run with the small model (slower per claim), so the run lasts while the harness breaks things.
SLOW_CASES = {2, 3, 4, 6, 8}
SUBCASES = {"9a": "garbage broker.sqlite3", "9b": "Latin-1 templates", "9c": "duplicate template id",
            "9d": "bad JSON on line 1500"}  # fmt: skip


def run_case(number: int, env: Env) -> list[Row]:
    name, function = CASES[number]
    base = env.base / f"case{number}"
    base.mkdir(parents=True, exist_ok=True)
    model = env.small if number in SLOW_CASES else env.tiny
    run = Run(base, model)
    started = time.monotonic()
    if number == 9:
        rows = {key: Row(case=key, name=text) for key, text in SUBCASES.items()}
        result = list(rows.values())
    else:
        row = Row(case=str(number), name=name)
        result = [row]
    try:
        if number == 9:
            function(env, rows, run)
        else:
            function(env, row, run)
    except Exception as exc:  # noqa: BLE001 - the case could not be run: an error row, not the end of the script
        print(traceback.format_exc(), file=sys.stderr)
        unfinished = [r for r in result if r.verdict == "error"] or result[:1]
        for r in unfinished:
            r.verdict = "error"
            r.note(f"harness: {type(exc).__name__}: {exc}")
    finally:
        run.close()
        tracebacks = run.procs.tracebacks()
        for r in result:
            if number != 9:
                r.tb = ",".join(tracebacks) or "-"
                r.seconds = time.monotonic() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(map(str, CASES)), help="comma-separated numbers (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hostile.csv",
                        help="CSV file to write (default: bench/results/hostile.csv)")  # fmt: skip
    parser.add_argument("--base-dir", type=Path, default=None, help="scratch directory (default: /tmp/hostile-*)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, outputs, states)")
    args = parser.parse_args(argv)
    numbers = [int(n) for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in numbers if n not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {list(CASES)}")
    if not FEVER_DEV.exists():
        parser.error(f"FEVER claims not found at {FEVER_DEV}")
    if args.base_dir is not None and args.base_dir.exists() and any(args.base_dir.iterdir()):
        parser.error(f"--base-dir {args.base_dir} is not empty: a case must not find an earlier run's state")
    base = args.base_dir or Path(tempfile.mkdtemp(prefix="hostile-", dir="/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    print(f"hostile: tree {ROOT}, scratch {base}, python {sys.executable}", flush=True)
    models = Procs(base / "models")
    env = Env(base=base, tiny=base / "models" / "tiny", small=base / "models" / "small")
    for size, directory in (("tiny", env.tiny), ("small", env.small)):
        if size == "small" and not SLOW_CASES & set(numbers):
            continue
        models.start(f"{size}-model", "tiny-model", "--size", size, str(directory))
        if models.wait(f"{size}-model", 300) != 0 or not (directory / "config.json").exists():
            print(f"hostile: cannot build the {size} model:\n{models.stderr(f'{size}-model')}", file=sys.stderr)
            models.close()
            return 2
    rows: list[Row] = []
    total = time.monotonic()
    try:
        for number in numbers:
            print(f"hostile: case {number} ({CASES[number][0]}) ...", flush=True)
            for row in run_case(number, env):
                rows.append(row)
                print(f"  {row.case} {row.verdict} in {row.seconds:.0f} s: {row.observed}", flush=True)
    finally:
        if rows:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
                writer.writeheader()
                writer.writerows(asdict(r) for r in rows)
        print()
        print(format_table(rows))
        print(f"\n{len(rows)} rows in {time.monotonic() - total:.0f} s; CSV: {args.out}")
        if args.keep:
            print(f"scratch kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
