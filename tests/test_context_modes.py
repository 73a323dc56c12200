"""The paper's three context modes on one workload: the same verdicts, at different costs.

Each mode runs the whole pipeline (``pervade run``: broker, two workers, sink, producer as processes) on the
tiny model, and must produce exactly the reference verdicts. What differs is what the workers keep: full
keeps the model resident (one load per worker), partial keeps only the files in the node cache and rebuilds
the model per batch, agnostic keeps nothing and reads the origin for every batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pervade.jobs.local import LocalRunConfig, read_events, run_local
from pervade.producer.claims import ClaimsSource, read_claims
from pervade.producer.templates import dump_templates, load_templates
from pervade.sinks.summary import read_verdicts
from tests.reference import reference_verdicts

CLAIMS = 40


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["partial", "agnostic"])
async def test_every_mode_gives_the_reference_verdicts(mode: str, tmp_path: Path, tiny_model: Path, fever_claims: Path) -> None:
    templates = {k: v for k, v in load_templates().items() if k == "direct"}
    templates_file = tmp_path / "templates.json"
    templates_file.write_text(dump_templates(templates))
    cache = tmp_path / "cache"
    result = await run_local(
        LocalRunConfig(
            claims=str(fever_claims), templates=templates_file, out_dir=tmp_path / "out", model=str(tiny_model),
            limit=CLAIMS, batch_size=8, device="cpu", threads_per_worker=1, context_mode=mode, cache_dir=cache,
            log_level="debug",
        )
    )  # fmt: skip
    rows = read_verdicts(result.out_dir).to_pylist()
    expected = reference_verdicts(tiny_model, templates, list(read_claims(ClaimsSource(str(fever_claims), limit=CLAIMS))))
    assert {(r["claim_id"], r["template_id"]): r["verdict"] for r in rows} == {k: v[0] for k, v in expected.items()}

    workers = [p.stem for p in result.log_dir.glob("worker-*.log")]
    loaded = [e for w in workers for e in read_events(result.log_dir / f"{w}.log", "context_loaded")]
    per_batch = [e for w in workers for e in read_events(result.log_dir / f"{w}.log", "batch_context_loaded")]
    assert loaded and not any(e["resident"] for e in loaded), "no model may stay resident outside full mode"
    assert len(per_batch) == CLAIMS // 8, "every batch builds its own model"
    blobs = list((cache / "blobs").iterdir())
    if mode == "partial":
        assert all(e["from_cache"] for e in per_batch) and len(blobs) >= 3  # weights, config, tokenizer
    else:
        assert not any(e["from_cache"] for e in per_batch) and blobs == []  # the node cache is never used
