"""The whole pipeline as separate processes on loopback: broker, two workers, a sink, producers.

Checks what a user relies on: every (claim, template) pair gets exactly one row, every verdict equals the
one a plain reference loop computes with the same model and prompts, and each worker loads the model once,
however many batches and jobs follow.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pytest
import pytest_asyncio
import torch

from gpuworker.engine import load_context, render_prompt
from jobs.local import ProcessGroup, read_events, wait_for_endpoint
from pervade.constants import LABELS
from pervade.context import make_context
from producer.claims import ClaimsSource, read_claims
from producer.templates import load_templates
from sinks.summary import read_verdicts
from tests.waiting import wait_until

pytestmark = pytest.mark.asyncio(loop_scope="module")

CLAIMS = 500
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
        process = await self.procs.start(name, "produce", "--broker", self.endpoint, "--model", str(self.model), "--wait", *args)
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
    templates_file.write_text(json.dumps({k: templates[k] for k in ("direct", "fact_checker")}))
    procs = ProcessGroup(log_dir)
    try:
        broker = await procs.start("broker", "broker", "--bind", "tcp://127.0.0.1:*", "--endpoint-file", str(base / "endpoint"))
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


def reference_verdicts(model_dir: Path, templates: dict[str, str], claims) -> dict[tuple[str, str], tuple[str, list[float]]]:
    """The plain loop a user would write: one prompt at a time, full logits, argmax over the labels."""
    context = load_context(make_context(str(model_dir)).spec, torch.device("cpu"))
    expected = {}
    with torch.inference_mode():
        for template_id, template in templates.items():
            for claim in claims:
                encoded = context.tokenizer(render_prompt(template, claim.text), return_tensors="pt")
                scores = context.model(**encoded).logits[0, -1, context.label_ids].tolist()
                expected[(claim.claim_id, template_id)] = (LABELS[max(range(3), key=scores.__getitem__)], scores)
    return expected


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
    assert set(pc.unique(table["verdict"]).to_pylist()) == set(LABELS), "verdicts that never vary prove little"
    assert set(pc.unique(table["worker_id"]).to_pylist()) == set(WORKERS), "both workers should have taken work"


async def test_later_batches_go_to_the_workers_already_holding_the_model(cluster: Cluster, fever_claims: Path) -> None:
    """A second job for the same model: served by the two warm workers, with no new model load."""
    rows_before = read_verdicts(cluster.out_dir).num_rows
    await cluster.produce("producer-2", "--claims", str(fever_claims), "--limit", "200",
                          "--templates", str(cluster.templates_file), "--batch-size", "8")  # fmt: skip
    table = read_verdicts(cluster.out_dir)
    second_job = table.filter(pc.invert(pc.is_in(table["job_id"], pc.unique(table.slice(0, rows_before)["job_id"]))))
    assert second_job.num_rows == 400
    assert set(pc.unique(second_job["worker_id"]).to_pylist()) == set(WORKERS)

    for name in WORKERS:
        assert len(cluster.events(name, "context_loaded")) == 1, f"{name} loaded the model more than once"
    assert len(cluster.events("broker", "told_to_load")) == len(WORKERS)

