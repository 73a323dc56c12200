"""The whole pipeline as separate processes on loopback: broker, two workers, a sink, producers.

Checks what a user relies on: every (claim, template) pair gets exactly one row, every verdict equals the
one a plain reference loop computes with the same model and prompts, and each worker loads the model once,
however many batches and jobs follow.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import sys
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pyarrow.compute as pc
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from pervade.context import make_context
from pervade.jobs.local import ProcessGroup, read_events, wait_for_endpoint
from pervade.producer.claims import ClaimsSource, read_claims
from pervade.producer.templates import dump_templates, load_templates
from pervade.protocol import StatusSnapshot
from pervade.sinks.summary import read_verdicts
from tests.reference import reference_verdicts
from tests.waiting import wait_until

pytestmark = pytest.mark.asyncio(loop_scope="module")

CLAIMS = 500
#: A plain template with the default answers and a calibrated chat template with answers of its own.
TEMPLATES = ("direct", "chat_yes_no_calibrated")
WORKERS = ("worker-a", "worker-b")
PROCESS_TIMEOUT_S = 240


@dataclass
class Cluster:
    procs: ProcessGroup
    endpoint: str
    out_dir: Path
    model: Path
    templates_file: Path

    async def produce(self, name: str, *args: str) -> str:
        """Run a producer process with --wait to completion; returns its stdout+stderr."""
        process = await self.procs.start(
            name, "produce", "--broker", self.endpoint, "--model", str(self.model), "--wait", *args
        )
        code = await asyncio.wait_for(process.wait(), PROCESS_TIMEOUT_S)
        assert code == 0, self.procs.tail(name)
        return (self.procs.log_dir / f"{name}.log").read_text()

    def events(self, name: str, event: str) -> list[dict]:
        return read_events(self.procs.log_dir / f"{name}.log", event)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(tmp_path_factory, tiny_model) -> AsyncIterator[Cluster]:
    base = tmp_path_factory.mktemp("cluster")
    log_dir, out_dir = base / "logs", base / "out"
    log_dir.mkdir()
    templates = load_templates()
    templates_file = base / "templates.json"
    templates_file.write_text(dump_templates({k: templates[k] for k in TEMPLATES}))
    procs = ProcessGroup(log_dir)
    try:
        broker = await procs.start("broker", "broker", "--bind", "tcp://127.0.0.1:*", "--endpoint-file", str(base / "endpoint"),
                                   "--metrics-port", "0")  # fmt: skip
        endpoint = await wait_for_endpoint(base / "endpoint", broker)
        await procs.start("sink", "sink", "--broker", endpoint, "--out", str(out_dir))
        for name in WORKERS:
            await procs.start(name, "worker", "--broker", endpoint, "--device", "cpu", "--threads", "1", "--worker-id", name,
                              "--cache-dir", str(base / f"cache-{name}"), "--file-host", "127.0.0.1", "--file-bind-host", "127.0.0.1")  # fmt: skip
        cluster = Cluster(procs, endpoint, out_dir, tiny_model, templates_file)
        # Both serving before the first job: a worker alone would take the whole small job into its window.
        await wait_until(lambda: all(cluster.events(n, "worker_started") for n in WORKERS), 120, "workers serving")
        yield cluster
    finally:
        await procs.stop(["sink", *WORKERS, "broker"])


async def test_every_pair_gets_exactly_one_row_with_the_reference_verdict(cluster: Cluster, fever_claims: Path) -> None:
    output = await cluster.produce("producer-1", "--claims", str(fever_claims), "--limit", str(CLAIMS),
                                   "--templates", str(cluster.templates_file), "--batch-size", "16")  # fmt: skip
    assert f"all {CLAIMS * 2} pairs written" in output

    claims = list(read_claims(ClaimsSource(str(fever_claims), limit=CLAIMS)))
    templates = json.loads(cluster.templates_file.read_text())
    expected = reference_verdicts(cluster.model, templates, claims)

    table = read_verdicts(cluster.out_dir)
    rows = table.to_pylist()
    keys = Counter((r["claim_id"], r["template_id"], r["context_id"]) for r in rows)
    assert max(keys.values()) == 1, "a pair was written twice"
    assert {(c, t) for c, t, _ in keys} == set(expected), "pairs missing or unexpected"
    assert len({r["context_id"] for r in rows}) == 1

    gold = {c.claim_id: c.gold_label for c in claims}
    mismatches = []
    for r in rows:
        verdict, scores = expected[(r["claim_id"], r["template_id"])]
        if r["verdict"] != verdict:
            mismatches.append((r["claim_id"], r["template_id"], r["verdict"], verdict, scores))
        got = [r["score_supports"], r["score_refutes"], r["score_not_enough_info"]]
        assert got == pytest.approx(scores, abs=1e-3)
        assert r["gold_label"] == gold[r["claim_id"]]
    assert mismatches == []
    assert len(pc.unique(table["verdict"])) >= 2, "verdicts that never vary prove little"
    assert set(pc.unique(table["worker_id"]).to_pylist()) == set(WORKERS), "both workers should have taken work"


async def test_later_batches_go_to_the_workers_already_holding_the_model(cluster: Cluster, fever_claims: Path) -> None:
    """A second job for the same model: served by the two warm workers, with no new model load."""
    rows_before = read_verdicts(cluster.out_dir).num_rows
    copies_before = (await broker_status(cluster)).counters["speculative_assignments"]
    await cluster.produce("producer-2", "--claims", str(fever_claims), "--limit", "200",
                          "--templates", str(cluster.templates_file), "--batch-size", "8")  # fmt: skip
    table = read_verdicts(cluster.out_dir)
    second_job = table.filter(pc.invert(pc.is_in(table["job_id"], pc.unique(table.slice(0, rows_before)["job_id"]))))
    assert second_job.num_rows == 400
    writers = set(pc.unique(second_job["worker_id"]).to_pylist())
    if writers != set(WORKERS):
        # The broker hands the batches to both workers in turn; a worker that falls idle first copies what the
        # other holds unstarted (Scheduler.speculate) and may answer all of it first, as the suite's load can
        # make it. Then its rows stand for copies the broker made, never for a worker passed over.
        copies = (await broker_status(cluster)).counters["speculative_assignments"] - copies_before
        assert writers < set(WORKERS) and copies > 0

    for name in WORKERS:
        assert len(cluster.events(name, "context_loaded")) == 1, f"{name} loaded the model more than once"
    assert len(cluster.events("broker", "told_to_load")) == len(WORKERS)


async def pervade_output(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "pervade", *args, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def broker_status(cluster: Cluster) -> StatusSnapshot:
    """What ``pervade status --json`` says of the cluster's broker now."""
    reply = await pervade_output("status", "--broker", cluster.endpoint, "--json")
    return msgspec.json.decode(reply, type=StatusSnapshot)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample a Prometheus scrape of ``url`` returns: (name, sorted labels) -> value."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


async def test_status_and_metrics_show_the_live_workers_and_agree_with_the_output(cluster: Cluster) -> None:
    """After the jobs above: what `pervade status` and the Prometheus metrics say is what the output holds."""
    rows = read_verdicts(cluster.out_dir).num_rows
    snapshot = msgspec.json.decode(
        await pervade_output("status", "--broker", cluster.endpoint, "--json"), type=StatusSnapshot
    )
    assert sorted(w.worker_id for w in snapshot.workers) == sorted(WORKERS)
    for worker in snapshot.workers:
        assert worker.state == "idle" and worker.device.startswith("cpu") and worker.host
        assert worker.contexts == [str(cluster.model)] and worker.batches_done > 0 and worker.last_seen_s < 10
    assert sum(w.claims_done for w in snapshot.workers) == rows == snapshot.counters["claims_completed"]
    assert snapshot.pairs_total == snapshot.pairs_done == rows and snapshot.eta_s == 0.0
    assert [j.done for j in snapshot.jobs] == [True, True] and sum(j.pairs for j in snapshot.jobs) == rows
    assert [(c.model, c.queued_batches, c.workers, c.loaded_workers) for c in snapshot.contexts] == [
        (str(cluster.model), 0, 2, 2)
    ]
    manifest_bytes = make_context(str(cluster.model)).manifest.total_bytes
    c = snapshot.counters
    assert c["context_loads"] == 2 and c["origin_bytes"] > 0
    assert c["origin_bytes"] + c["peer_bytes"] + c["cached_bytes"] == 2 * manifest_bytes

    text = await pervade_output("status", "--broker", cluster.endpoint)  # not a terminal: one snapshot, as text
    assert f"done {rows:,} of {rows:,} pairs (100.0%)" in text and all(name in text for name in WORKERS)

    (listening,) = cluster.events("broker", "metrics_listening")
    samples: dict[tuple[str, tuple], float] = {}

    def metrics_caught_up() -> bool:  # the exporter's snapshot is refreshed once a second
        samples.update(scrape(listening["url"]))
        return samples.get(("pervade_claims_completed_total", ())) == rows

    await wait_until(metrics_caught_up, 10, "the metrics to count every claim")
    device = snapshot.workers[0].device
    assert samples[("pervade_workers", (("device", device), ("state", "idle")))] == 2
    assert samples[("pervade_context_loads_total", ())] == 2
    for source, counter in (("peer", "peer_bytes"), ("origin", "origin_bytes"), ("cache", "cached_bytes")):
        assert samples[("pervade_model_file_bytes_total", (("source", source),))] == c[counter]
    context_id = snapshot.contexts[0].context_id
    assert samples[("pervade_queue_depth_batches", (("context_id", context_id), ("model", str(cluster.model))))] == 0
    assert samples[("pervade_pairs_done", ())] == rows and samples[("pervade_requeues_total", ())] == c["requeues"]


class Terminal:
    """A process whose stdout and stderr are a pseudo-terminal, as when a person runs it; its screen output
    is collected until it exits. Use with ``async with``: a process still running at the end is killed."""

    def __init__(self) -> None:
        self.controller, self.terminal = pty.openpty()
        self.output = bytearray()
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Future[None] | None = None

    async def __aenter__(self) -> Terminal:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()  # the reader thread then sees the terminal close
            await self.process.wait()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 10)
        os.close(self.controller)

    async def start(self, *args: str) -> None:
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160"}
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pervade", *args, stdin=asyncio.subprocess.DEVNULL, stdout=self.terminal,
            stderr=self.terminal, env=env,
        )  # fmt: skip
        os.close(self.terminal)
        self._reader = asyncio.ensure_future(asyncio.to_thread(self._read))

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.controller, 65536)
            except OSError:  # EIO: every holder of the terminal has closed it
                return
            if not chunk:
                return
            self.output += chunk

    async def finish(self, timeout_s: float = PROCESS_TIMEOUT_S) -> tuple[int, str]:
        assert self.process is not None and self._reader is not None
        code = await asyncio.wait_for(self.process.wait(), timeout_s)
        await asyncio.wait_for(self._reader, 10)
        return code, self.output.decode(errors="replace")


async def test_progress_bars_on_a_terminal_and_none_in_logs(cluster: Cluster, fever_claims: Path) -> None:
    """A producer and a second sink run on a terminal draw their bars; the same programs writing to log
    files (every process above) draw none."""
    async with Terminal() as sink, Terminal() as producer:
        await sink.start(
            "sink", "--broker", cluster.endpoint, "--out", str(cluster.out_dir), "--sink-id", "sink-on-a-terminal"
        )
        await wait_until(lambda: b"sink_started" in sink.output, 60, "the terminal's sink to start")
        await producer.start("produce", "--broker", cluster.endpoint, "--model", str(cluster.model), "--wait", "--claims",
                             str(fever_claims), "--limit", "120", "--templates", str(cluster.templates_file), "--batch-size", "4")  # fmt: skip
        code, shown = await producer.finish()
        assert code == 0, shown
        assert "pairs sent" in shown and "pairs acknowledged" in shown and "240/240" in shown
        # the sink asks the broker for the run's progress each second: it catches up with the job
        await wait_until(
            lambda: b"240/240" in sink.output, 10, f"the sink's bar to show the job written: {sink.output[-2000:]!r}"
        )
        assert sink.process is not None
        sink.process.terminate()
        code, sink_shown = await sink.finish()
        assert code == 0, sink_shown
    rates = [float(r.replace(",", "")) for r in re.findall(r"([\d,.]+) verdicts/s", sink_shown)]
    assert "verdicts written" in sink_shown and max(rates) > 0, sink_shown

    logs = list(cluster.procs.log_dir.glob("*.log"))
    assert {"sink.log", *(f"{w}.log" for w in WORKERS)} <= {p.name for p in logs}
    for log in logs:
        logged = log.read_text()
        assert "pairs sent" not in logged and "verdicts written" not in logged and "\x1b[" not in logged, log.name
