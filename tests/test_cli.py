"""The ``pervade`` command as a user runs it: help, the offline local run, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pervade.sinks.summary import read_verdicts

SUBCOMMANDS = ["broker", "worker", "produce", "sink", "run", "tiny-model"]


def pervade(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pervade", *args],
        capture_output=True, text=True, cwd=cwd, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_help_lists_every_role_and_every_subcommand_explains_its_options() -> None:
    top = pervade("--help")
    assert top.returncode == 0
    for name in SUBCOMMANDS:
        assert name in top.stdout
        sub = pervade(name, "--help")
        assert sub.returncode == 0, sub.stderr
        options = [line for line in sub.stdout.splitlines() if line.strip().startswith("--")]
        assert options, f"{name} --help lists no options"
    produce = pervade("produce", "--help").stdout
    for flag in ("--claims", "--templates", "--model", "--limit", "--batch-size", "--id-field", "--claim-field", "--label-field", "--max-unacked", "--wait"):
        assert flag in produce


def test_run_with_no_flags_works_offline(tmp_path: Path) -> None:
    """The README's quick start: shipped claims, default templates, the tiny model built on first use."""
    result = pervade("run", cwd=tmp_path, env={"XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr + result.stdout
    assert "240 verdicts for 60 claims x 4 templates, 2 workers" in result.stdout
    for template in ("direct", "fact_checker", "verdict_only", "wiki_evidence"):
        assert template in result.stdout
    [out_dir] = [p for p in (tmp_path / "pervade-out").iterdir() if p.name.startswith("run-") and p.suffix != ".logs"]
    assert sorted(p.suffix for p in out_dir.iterdir()) == [".parquet"]  # nothing else in the output
    assert read_verdicts(out_dir).num_rows == 240
    assert {p.name for p in out_dir.with_name(out_dir.name + ".logs").glob("*.log")} >= {"broker.log", "sink.log", "producer.log"}
    assert (tmp_path / "cache" / "pervade" / "tiny-model-v1" / "config.json").exists()
    broker_log = (out_dir.with_name(out_dir.name + ".logs") / "broker.log").read_text()
    assert '"event": "broker_listening"' in broker_log and '"curve": true' in broker_log  # throwaway keys


def test_run_refuses_to_mix_results_into_a_used_directory(tmp_path: Path) -> None:
    (tmp_path / "old.parquet").write_bytes(b"PAR1")
    result = pervade("run", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "already holds 1 Parquet files; pass --overwrite" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--templates", "TEMPLATES"], "must contain {claim} exactly once"),
        (["--claims", "absent.jsonl"], "absent.jsonl: no such file"),
        (["--claims", "CLAIMS", "--dtype", "float64"], "invalid choice: 'float64'"),
        (["--claims", "CLAIMS", "--batch-size", "0"], "must be at least 1"),
    ],
)
def test_produce_explains_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "templates.json").write_text(json.dumps({"t": "no placeholder"}))
    (tmp_path / "claims.jsonl").write_text(json.dumps({"id": 1, "claim": "x"}) + "\n")
    args = [a.replace("TEMPLATES", str(tmp_path / "templates.json")).replace("CLAIMS", str(tmp_path / "claims.jsonl")) for a in args]
    if "--claims" not in args:
        args += ["--claims", str(tmp_path / "claims.jsonl")]
    result = pervade("produce", "--broker", "tcp://127.0.0.1:9", "--model", "some/model", *args, cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_produce_gives_up_after_its_timeout_when_no_broker_answers(tmp_path: Path) -> None:
    (tmp_path / "claims.jsonl").write_text(json.dumps({"id": 1, "claim": "x"}) + "\n")
    result = pervade("produce", "--broker", "tcp://127.0.0.1:9", "--model", "m", "--claims", str(tmp_path / "claims.jsonl"),
                     "--wait", "--timeout", "3", timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert "not finished within 3.0 s: the broker at tcp://127.0.0.1:9 acknowledged nothing (is it up" in result.stderr


def test_worker_prefetch_is_bounded_by_what_the_protocol_allows() -> None:
    result = pervade("worker", "--prefetch", "5000", timeout=60)
    assert result.returncode == 2 and "must be between 0 and 1023" in result.stderr
