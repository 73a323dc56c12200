"""Poison work, with real processes: a claim longer than the model's context fails alone (its batch is split
until it does; the other claims of the batch get their verdicts), and a model that loads nowhere is retried a
bounded number of times; failures are recorded beside the output, and the run finishes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from pervade.jobs.cluster import LocalCluster
from pervade.producer.claims import sample_claims_path
from pervade.producer.templates import load_templates
from pervade.sinks.failures import read_failures
from pervade.sinks.summary import read_verdicts

pytestmark = pytest.mark.asyncio(loop_scope="module")

TIMEOUT_S = 120


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(tmp_path_factory) -> AsyncIterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("poison"), heartbeat_interval_s=0.25)
    try:
        await cluster.start_broker("--max-attempts", "2")
        await cluster.start_sink("--roll-seconds", "0.5")
        for _ in range(2):
            await cluster.start_worker("--device", "cpu", "--threads", "1")
        yield cluster
    finally:
        await cluster.stop()


async def produce(cluster: LocalCluster, name: str, *args: str) -> tuple[int, str]:
    await cluster.start_producer(*args, "--wait", "--timeout", str(TIMEOUT_S), name=name)
    code = await cluster.procs.children[name].wait()
    return code, (cluster.procs.log_dir / f"{name}.log").read_text()


async def test_a_claim_longer_than_the_context_fails_alone_and_the_rest_is_written(cluster, tiny_model, tmp_path) -> None:
    claims = tmp_path / "claims.jsonl"
    records = [{"id": f"c{i}", "claim": f"Claim number {i} is true.", "label": "SUPPORTS"} for i in range(12)]
    records[5]["claim"] = "word " * 5000  # far beyond the tiny model's 2048 positions
    claims.write_text("".join(json.dumps(r) + "\n" for r in records))
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps({"t": "Claim: {claim}\nAnswer:"}))

    code, output = await produce(cluster, "producer-long", "--model", str(tiny_model), "--claims", str(claims),
                                 "--templates", str(templates), "--batch-size", "4")  # fmt: skip
    assert code == 1 and "job failed" in output and "exceed the model's 2048 positions" in output
    failed = {f["claim_id"]: f for f in read_failures(cluster.out_dir)}
    assert set(failed) == {"c5"}  # its batch (c4-c7) was split until the long claim failed alone
    assert all(f["attempts"] == 2 and "exceed the model's 2048 positions" in f["error"] for f in failed.values())
    written = read_verdicts(cluster.out_dir).to_pylist()
    assert sorted(r["claim_id"] for r in written) == sorted(f"c{i}" for i in range(12) if f"c{i}" != "c5")
    assert "1 of 3 batches failed (1 pairs recorded failed)" in output


async def test_a_model_no_worker_can_load_fails_its_batches_instead_of_looping(cluster, tmp_path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": "not a number"}')
    code, output = await produce(cluster, "producer-broken", "--model", str(broken), "--claims", str(sample_claims_path()),
                                 "--limit", "10", "--batch-size", "5")  # fmt: skip
    assert code == 1 and "no worker could load context" in output
    failed = [f for f in read_failures(cluster.out_dir) if f["model"] == str(broken)]
    assert len(failed) == 10 * len(load_templates())  # every pair of the job (10 claims x the shipped templates)
    assert all(f["error"].startswith("no worker could load context") or "failed to load" in f["error"] for f in failed)
