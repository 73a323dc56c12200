"""Batch-size insensitivity: a worker scores the small batches it has prefetched together, in passes sized
for its device, and the verdicts are the reference ones.

The batches are queued before the worker starts (as after a producer ran ahead of the workers), so what the
worker does with a deep queue of one-claim batches is deterministic: it widens its credit window to a few
runs' worth of claims and takes a run of one template's claims per call, gathered from wherever they are
queued (two templates here).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from pervade.jobs.cluster import LocalCluster
from pervade.producer.claims import ClaimsSource, read_claims
from pervade.producer.templates import dump_templates, load_templates
from pervade.sinks.summary import read_verdicts
from tests.reference import reference_verdicts
from tests.waiting import wait_until

CLAIMS = 300
PAIRS = CLAIMS * 2


@pytest.mark.asyncio
async def test_one_claim_batches_are_scored_in_a_few_passes_with_the_reference_verdicts(
    tmp_path: Path, tiny_model: Path, fever_claims: Path
) -> None:
    templates = {k: v for k, v in load_templates().items() if k in ("direct", "chat_yes_no_calibrated")}
    templates_file = tmp_path / "templates.json"
    templates_file.write_text(dump_templates(templates))
    cluster = LocalCluster(tmp_path / "cluster", heartbeat_interval_s=0.2, log_level="debug")
    try:
        await cluster.start_broker()
        await cluster.start_sink()
        await cluster.start_producer("--model", str(tiny_model), "--claims", str(fever_claims), "--limit", str(CLAIMS),
                                     "--templates", str(templates_file), "--batch-size", "1")  # fmt: skip
        assert await asyncio.wait_for(cluster.procs.children["producer"].wait(), 120) == 0
        worker = await cluster.start_worker("--device", "cpu", "--threads", "1")
        await wait_until(lambda: cluster.rows_written() >= PAIRS, 120, f"{PAIRS} rows written")
        passes = cluster.events(worker, "batches_done")
    finally:
        await cluster.stop()

    rows = read_verdicts(cluster.out_dir).to_pylist()
    assert len(rows) == PAIRS and len({r["batch_id"] for r in rows}) == PAIRS
    assert sum(p["batches"] for p in passes) == PAIRS
    assert len(passes) <= 12, f"{PAIRS} one-claim batches took {len(passes)} passes: {[p['batches'] for p in passes]}"
    by_start = Counter(r["started_at"] for r in rows)
    assert sorted(by_start.values()) == sorted(p["batches"] for p in passes), "rows of a pass share its start time"

    claims = list(read_claims(ClaimsSource(str(fever_claims), limit=CLAIMS)))
    expected = reference_verdicts(tiny_model, templates, claims)
    for r in rows:
        verdict, scores = expected[(r["claim_id"], r["template_id"])]
        assert r["verdict"] == verdict
        assert [r["score_supports"], r["score_refutes"], r["score_not_enough_info"]] == pytest.approx(scores, abs=1e-3)
