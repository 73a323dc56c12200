"""What a hostile operator on a busy cluster does, with real processes: each case broke pervade once
(issue 16: exit 0 with pairs lost, pairs written twice, runs that hung, tracebacks). Each test checks the
output with pyarrow, pair by pair: exactly one row per (claim, template), none missing.

Kept small (hundreds of pairs, the tiny or small model): the cases are about what happens around the
computation, not the computation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pervade.broker.wal import FRAME_HEADER_BYTES, HEADER_BYTES, scan_log
from pervade.jobs.cluster import LocalCluster
from pervade.producer.claims import ClaimsSource, read_claims
from pervade.sinks.summary import read_verdicts
from tests.templates import shipped_templates_file
from tests.waiting import wait_until

TEMPLATES = ("direct", "chat_yes_no_calibrated")
RUN_TIMEOUT_S = 180


def write_claims(source: Path, path: Path, start: int, count: int) -> Path:
    """Claims ``start`` .. ``start + count`` of ``source`` as a JSON-lines file."""
    claims = list(read_claims(ClaimsSource(str(source), limit=start + count)))[start:]
    path.write_text(
        "".join(json.dumps({"id": c.claim_id, "claim": c.text, "label": c.gold_label}) + "\n" for c in claims)
    )
    return path


def assert_exactly_once(out_dir: Path, claims_file: Path, job_id: str | None = None) -> None:
    """Every pair of the claims file's content has exactly one row (of job ``job_id``, when given: a
    changed claims file is a new job, which writes its own row for each of its pairs)."""
    rows = read_verdicts(out_dir, columns=["claim_id", "template_id", "job_id"]).to_pylist()
    counts = Counter((r["claim_id"], r["template_id"]) for r in rows if job_id is None or r["job_id"] == job_id)
    doubled = [k for k, n in counts.items() if n > 1]
    assert doubled == [], f"{len(doubled)} pairs written more than once, e.g. {doubled[:3]}"
    expected = {(c.claim_id, t) for c in read_claims(ClaimsSource(str(claims_file))) for t in TEMPLATES}
    missing = expected - set(counts)
    assert not missing, f"{len(missing)} pairs missing, e.g. {sorted(missing)[:3]}"


async def exit_code(cluster: LocalCluster, name: str, timeout_s: float = RUN_TIMEOUT_S) -> int:
    try:
        return await asyncio.wait_for(cluster.procs.children[name].wait(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"{name} still running after {timeout_s} s:\n{cluster.procs.tail(name, 30)}") from None


def damage_a_committed_frame_of(path: Path) -> None:
    """Overwrite the page of a frame halfway through the log's committed frames. (The middle of the file is
    not enough: past the current generation's frames the log holds stale ones, and damage there loses
    nothing, as the broker rightly finds.)"""
    scan = scan_log(path)
    assert scan is not None and scan.commit_frames, "the write-ahead log holds no commit to damage"
    frame = max(1, scan.commit_frames[-1] // 2)
    with open(path, "r+b") as handle:
        page_size = int.from_bytes(handle.read(12)[8:], "big")  # the log header's page size
        handle.seek(HEADER_BYTES + (frame - 1) * (FRAME_HEADER_BYTES + page_size) + FRAME_HEADER_BYTES)
        handle.write(os.urandom(page_size))


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
async def test_a_broker_that_loses_its_state_is_caught_up_by_its_producer(tmp_path, small_model, fever_claims) -> None:
    """A second broker on the live state is refused; the broker killed and its write-ahead log damaged comes
    back empty; then it is killed again and started on a new, empty state. The producer, waiting, hears
    each time that the broker holds less than it accepted, resubmits, and exits 0 only once every pair is
    written; the sink writes none twice."""
    claims = write_claims(fever_claims, tmp_path / "claims.jsonl", 0, 300)
    cluster = LocalCluster(tmp_path, heartbeat_interval_s=0.25)
    args = ("--model", str(small_model), "--claims", str(claims), "--templates", str(shipped_templates_file(tmp_path, TEMPLATES)),
            "--batch-size", "3", "--wait")  # fmt: skip
    try:
        await cluster.start_broker()
        await cluster.start_sink("--roll-seconds", "0.5", "--until-done")
        await cluster.start_producer(*args)
        await wait_until(lambda: cluster.events("producer", "job_submitted"), 60, "the job to be submitted")

        second = await cluster.procs.start(
            "broker-2", "broker", "--bind", "tcp://127.0.0.1:*", "--state", str(cluster.state_dir)
        )
        assert await asyncio.wait_for(second.wait(), 60) != 0
        assert "in use by another broker" in cluster.procs.tail("broker-2")
        assert "Traceback" not in cluster.procs.tail("broker-2", 100)

        await cluster.procs.kill("broker", signal.SIGKILL)
        damage_a_committed_frame_of(cluster.state_dir / "broker.sqlite3-wal")
        await cluster.start_broker()
        assert cluster.events("broker", "state_damaged"), cluster.procs.tail("broker")
        await wait_until(lambda: cluster.events("producer", "broker_lost_batches"), 60, "the producer to resubmit")

        await cluster.start_worker("--device", "cpu", "--threads", "1")
        await wait_until(lambda: cluster.rows_written() >= 150, 120, "a quarter of the rows")
        await cluster.procs.kill("broker", signal.SIGKILL)
        await cluster.start_broker("--state", str(tmp_path / "new-state"))  # an operator's fresh start

        assert await exit_code(cluster, "producer") == 0, cluster.procs.tail("producer")
        assert await exit_code(cluster, "sink", 60) == 0, cluster.procs.tail("sink")
    finally:
        await cluster.stop()
    assert_exactly_once(cluster.out_dir, claims)
    assert len(cluster.events("producer", "broker_lost_batches")) == 2
    assert "resubmitted 2 time(s)" in cluster.procs.tail("producer")


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
async def test_a_stalled_sink_does_not_write_what_another_sink_wrote_meanwhile(
    tmp_path, small_model, fever_claims
) -> None:
    """Two sinks on one directory; one is stopped (SIGSTOP) while it holds unacknowledged batches, declared
    dead, and its batches are written by the other. Woken (SIGCONT) and stopped, it publishes its file
    without them."""
    claims = write_claims(fever_claims, tmp_path / "claims.jsonl", 0, 300)
    cluster = LocalCluster(tmp_path, heartbeat_interval_s=0.25)
    try:
        # Slices of four batches: many deliveries, so each sink holds some when one stalls, and the stalled
        # one's file holds slices whose batches the other wrote (skipped batch by batch).
        await cluster.start_broker("--slice-claims", "12")
        await cluster.start_sink("--roll-seconds", "0.5", name="fast")
        await cluster.start_sink("--roll-seconds", "600", "--idle-roll-seconds", "600", name="stalled")
        await cluster.start_worker("--device", "cpu", "--threads", "1")
        await cluster.start_producer("--model", str(small_model), "--claims", str(claims),
                                     "--templates", str(shipped_templates_file(tmp_path, TEMPLATES)), "--batch-size", "3", "--wait")  # fmt: skip
        await wait_until(lambda: cluster.rows_written() >= 60, 120, "the fast sink's first rows")
        cluster.procs.children["stalled"].send_signal(signal.SIGSTOP)
        await wait_until(lambda: any(e.get("sink_id") == "stalled" for e in cluster.events("broker", "sink_left")),
                         30, "the broker to declare the stalled sink dead")  # fmt: skip
        assert await exit_code(cluster, "producer") == 0, cluster.procs.tail("producer")  # all written by "fast"
        cluster.procs.children["stalled"].send_signal(signal.SIGCONT)
        assert await cluster.procs.kill("stalled", signal.SIGTERM) == 0, cluster.procs.tail("stalled")
    finally:
        await cluster.stop()
    assert_exactly_once(cluster.out_dir, claims)
    skipped = cluster.events("stalled", "batches_written_by_another_sink")
    assert skipped and skipped[0]["skipped"] > 0  # it did hold some: the case was exercised


SKEWED_CLOCK = """
import sys, time
_true_time = time.time
time.time = lambda: _true_time() - 2e9  # a node whose clock is 63 years behind
from pervade.cli import main
sys.exit(main())
"""


async def pervade_command(*args: str, timeout_s: float = 120) -> tuple[int, str]:
    """Run ``pervade ARGS`` to completion; exit status and what it printed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pervade", *args, "--log-json", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    return process.returncode or 0, output.decode(errors="replace")


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
async def test_workers_and_inputs_an_operator_gets_wrong(tmp_path, tiny_model, fever_claims) -> None:
    """A worker with a clock 2e9 s behind (its results kept, timed on the broker's clock); a second worker
    under a live worker's id (refused, exits with the reason); a claims file that grows, then is replaced,
    under the same path (each version computed whole); and bad inputs, refused with one clear line before
    anything is sent."""
    claims = write_claims(fever_claims, tmp_path / "claims.jsonl", 0, 100)
    templates = shipped_templates_file(tmp_path, TEMPLATES)
    cluster = LocalCluster(tmp_path, heartbeat_interval_s=0.25)
    skewed_log = tmp_path / "logs" / "skewed.log"
    skewed = None
    try:
        await cluster.start_broker()
        await cluster.start_sink("--roll-seconds", "0.5")
        wrapper = tmp_path / "skewed_clock.py"
        wrapper.write_text(SKEWED_CLOCK)
        with open(skewed_log, "wb") as log:
            skewed = await asyncio.create_subprocess_exec(
                sys.executable, str(wrapper), "worker", "--broker", cluster.endpoint, "--worker-id", "skewed",
                "--device", "cpu", "--threads", "1", "--heartbeat-interval", "0.25", "--log-json",
                "--cache-dir", str(tmp_path / "caches" / "skewed"), "--no-serve-files", stdout=log, stderr=log,
            )  # fmt: skip
        await wait_until(lambda: '"worker_started"' in skewed_log.read_text(), 90, "the skewed worker to start")
        await cluster.start_worker("--device", "cpu", "--threads", "1", "--worker-id", "gpu-0")
        await wait_until(lambda: cluster.serving_workers(), 90, "worker-0 to start")
        await cluster.procs.start("impostor", "worker", "--broker", cluster.endpoint, "--worker-id", "gpu-0",
                                  "--device", "cpu", "--threads", "1", "--heartbeat-interval", "0.25",
                                  "--cache-dir", str(tmp_path / "caches" / "impostor"), "--no-serve-files")  # fmt: skip
        assert await exit_code(cluster, "impostor", 90) == 1
        assert "worker id 'gpu-0' is in use by another live worker" in cluster.procs.tail("impostor")

        produce = ("produce", "--broker", cluster.endpoint, "--model", str(tiny_model), "--claims", str(claims),
                   "--templates", str(templates), "--batch-size", "8", "--wait", "--heartbeat-interval", "0.25")  # fmt: skip
        jobs = []
        for version in ("first 100", "40 appended", "replaced by 140 others", "unchanged"):
            if version == "40 appended":
                with open(claims, "a") as out:
                    out.write(write_claims(fever_claims, tmp_path / "more.jsonl", 100, 40).read_text())
            elif version == "replaced by 140 others":
                write_claims(fever_claims, claims, 1000, 140)
            rows_before = cluster.rows_written()
            code, output = await pervade_command(*produce)
            assert code == 0, f"{version}: {output}"
            jobs.append(re.search(r"^job (job-[0-9a-f]{16}): ", output, re.MULTILINE).group(1))
            assert_exactly_once(cluster.out_dir, claims, jobs[-1])
        assert len(set(jobs[:3])) == 3 and jobs[3] == jobs[2]  # an edited file is a new job; a re-run is not
        assert cluster.rows_written() == rows_before  # the unchanged re-run computed nothing
        assert "(36 batches were already there)" in output  # 140 claims in 18 chunks of 8, x 2 templates
    finally:
        if skewed is not None and skewed.returncode is None:
            skewed.send_signal(signal.SIGTERM)
            await asyncio.wait_for(skewed.wait(), 30)
        await cluster.stop()
    rows = read_verdicts(cluster.out_dir, columns=["worker_id", "started_at", "finished_at"]).to_pylist()
    by_skewed = [r for r in rows if r["worker_id"] == "skewed"]
    assert by_skewed, "the skewed worker computed nothing: the case was not exercised"
    assert min(r["started_at"].year for r in by_skewed) >= 2026  # timed on the broker's clock, not 1963
    assert "worker_clock_skewed" in cluster.procs.tail("broker", 400) or cluster.events("broker", "worker_clock_skewed")

    # bad input: refused whole, before anything is sent, in one line
    bad = [{"id": i, "claim": f"claim {i}"} for i in range(2000)]
    bad[1800]["id"] = 7
    bad_claims = tmp_path / "bad.jsonl"
    bad_claims.write_text("".join(json.dumps(r) + "\n" for r in bad))
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"fr": "Vérifiez : {claim}"}'.encode("latin-1"))
    repeated = tmp_path / "repeated.json"
    repeated.write_text('{"a": "{claim} one", "a": "{claim} two"}')
    broken_line = tmp_path / "broken.jsonl"
    lines = [json.dumps({"id": i, "claim": f"claim {i}"}) for i in range(2000)]
    lines[1499] = '{"id": 1499, "claim": "cut sh'
    broken_line.write_text("\n".join(lines) + "\n")
    garbage_state = tmp_path / "garbage-state"
    garbage_state.mkdir()
    (garbage_state / "broker.sqlite3").write_bytes(os.urandom(8192))
    refused = "produce", "--broker", "tcp://127.0.0.1:9", "--model", str(tiny_model), "--wait"
    cases = [
        ((*refused, "--claims", str(bad_claims)), 2, "record 1801: id '7' was already used by an earlier record"),
        ((*refused, "--claims", str(broken_line)), 2, "record 1500 (line 1500) is not valid JSON"),
        ((*refused, "--claims", str(claims), "--templates", str(latin)), 2, "not UTF-8 text (byte 0xe9 on line 1)"),
        (
            (*refused, "--claims", str(claims), "--templates", str(repeated)),
            2,
            "'a' appears more than once in one JSON object",
        ),
        (("broker", "--bind", "tcp://127.0.0.1:*", "--state", str(garbage_state)), 1, "damaged or not a pervade state"),
    ]
    for args, expected, message in cases:
        code, output = await pervade_command(*args)
        assert (code, "Traceback" in output) == (expected, False), output
        assert message in output and "broker_connected" not in output, output


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small file system needs root (CI runs as root)")
@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
async def test_a_sink_on_a_full_disk_waits_and_writes_everything_once_space_returns(
    tmp_path, tiny_model, fever_claims
) -> None:
    claims = write_claims(fever_claims, tmp_path / "claims.jsonl", 0, 200)
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    out = mount / "out"
    cluster = LocalCluster(tmp_path, heartbeat_interval_s=0.25)
    try:
        filler = mount / "filler"
        with open(filler, "wb") as handle, contextlib.suppress(OSError):
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        await cluster.start_broker()
        await cluster.start_sink("--out", str(out), "--roll-seconds", "0.5")
        await cluster.start_worker("--device", "cpu", "--threads", "1")
        await cluster.start_producer("--model", str(tiny_model), "--claims", str(claims),
                                     "--templates", str(shipped_templates_file(tmp_path, TEMPLATES)), "--batch-size", "8", "--wait")  # fmt: skip
        await wait_until(
            lambda: len(cluster.events("sink", "output_write_failed")) >= 2, 90, "the sink to hit the full disk"
        )
        assert cluster.running("sink") and [p.suffix for p in out.iterdir()] == []  # no half file in the output
        filler.unlink()
        assert await exit_code(cluster, "producer") == 0, cluster.procs.tail("producer")
        assert {p.suffix for p in out.iterdir()} == {".parquet"}
        assert not list((mount / ".out.partial").glob("*.partial"))
        assert await cluster.procs.kill("sink", signal.SIGTERM) == 0
        assert_exactly_once(out, claims)
    finally:
        await cluster.stop()
        subprocess.run(["umount", "-l", str(mount)], check=False)
    assert "Traceback" not in (tmp_path / "logs" / "sink.log").read_text()
