"""The ``pervade`` command as a user runs it: help, the offline local run, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pervade.broker.config import BrokerConfig
from pervade.cli import build_parser, main
from pervade.gpuworker.config import WorkerConfig
from pervade.jobs.local import LocalRunConfig
from pervade.jobs.node import NodeConfig
from pervade.jobs.submit import JobSpec
from pervade.monitor import WatchOptions
from pervade.options import build_config, to_argv
from pervade.producer.run import ModelChoice, ProduceRequest
from pervade.samples import default_templates_path
from pervade.sinks.sink import SinkConfig
from pervade.sinks.summary import read_verdicts
from pervade.smollm2 import CACHE_NAME
from tests.shadowing import write_shadowing_files

SUBCOMMANDS = ["broker", "worker", "produce", "sink", "run", "tiny-model", "smollm2"]


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


def seed_model_cache(cache: Path, converted: Path) -> Path:
    """Put SmolLM2, converted once per session (the ``smollm2`` fixture), into a test's own cache: hard links
    where the file system allows, else copies. Converting from the GGUF is tests/test_smollm2.py's part; this
    test checks that a run finds and uses the model."""
    target = cache / "pervade" / CACHE_NAME
    target.parent.mkdir(parents=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(converted, target, copy_function=link)
    return target


def test_run_with_no_flags_works_offline(tmp_path: Path, smollm2) -> None:
    """The README's quick start (here on 3 claims): shipped claims, default templates, and SmolLM2 from
    pervade's model cache; run from a directory of the user's that holds a jobs.py, broker.py, ... (every
    process starts there)."""
    write_shadowing_files(tmp_path)
    model = seed_model_cache(tmp_path / "cache", smollm2.path)
    weights = (model / "model.safetensors").stat().st_ino
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    result = pervade("run", "--limit", "3", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    assert (model / "model.safetensors").stat().st_ino == weights, "the cached model is used, not converted again"
    templates = json.loads(default_templates_path().read_text(encoding="utf-8"))
    assert f"{3 * len(templates)} verdicts for 3 claims x {len(templates)} templates, 2 workers" in result.stdout
    assert f"model      {model}\n" in result.stdout
    for template in templates:
        assert template in result.stdout
    [out_dir] = [p for p in (tmp_path / "pervade-out").iterdir() if p.name.startswith("run-") and p.suffix != ".logs"]
    assert {p.suffix for p in out_dir.iterdir()} == {".parquet"}  # nothing else in the output
    assert read_verdicts(out_dir).num_rows == 3 * len(templates)
    assert {p.name for p in out_dir.with_name(out_dir.name + ".logs").glob("*.log")} >= {"broker.log", "sink.log", "producer.log"}
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


# --- one source: options, defaults and checks come from the config dataclasses (no subprocess) -------------


#: Each subcommand, the configs it fills, and the arguments it cannot do without.
CONFIGS = [
    ("broker", [BrokerConfig], [], {}),
    ("worker", [WorkerConfig], [], {}),
    ("produce", [ProduceRequest, ModelChoice], ["--claims", "c.jsonl", "--model", "m"],
     {"claims": "c.jsonl", "model": "m"}),
    ("sink", [SinkConfig], ["--out", "out"], {"out_dir": Path("out")}),
    ("run", [LocalRunConfig], [], {}),
    ("node", [NodeConfig], [], {}),
    ("submit", [JobSpec], ["--scheduler", "slurm", "--broker", "tcp://a:1"],
     {"scheduler": "slurm", "broker": "tcp://a:1"}),
]  # fmt: skip


def flagged_fields(cls: type, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dest, option, default) of every field of ``cls`` with a flag, nested configs' included."""
    import dataclasses

    from pervade.options import NESTED, OPTION

    found = []
    for field in dataclasses.fields(cls):
        inner = field.metadata.get(NESTED)
        if inner is not None:
            found += flagged_fields(inner.cls, f"{prefix}{field.name}.")
            continue
        opt = field.metadata.get(OPTION)
        if opt is not None and opt.flag is not None:
            default = field.default if field.default is not dataclasses.MISSING else dataclasses.MISSING
            if field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            found.append((prefix + field.name, opt, default))
    return found


def help_of(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare words


@pytest.mark.parametrize(("command", "classes", "required", "_"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_every_config_option_is_in_help_with_the_fields_default(command, classes, required, _, capsys) -> None:
    from pervade.options import MISSING, _text

    shown = help_of(command, capsys)
    options = [entry for cls in classes for entry in flagged_fields(cls)]
    assert options
    # Each option's entry in the listing (after the usage line): from its flag to the next option's flag.
    listing = shown.index(" options: ")
    starts = sorted((shown.index(f" {opt.flag} ", listing), opt, default) for _, opt, default in options)
    for (start, opt, default), following in zip(starts, [*starts[1:], (len(shown), None, None)], strict=True):
        entry = shown[start : following[0]]
        if default not in (MISSING, None, "", ()) and not isinstance(default, bool):  # None: its help says what
            expected = opt.show(default) if opt.show else _text(default, opt)
            assert f"(default: {expected})" in entry, f"{command} {opt.flag}: {entry}"


def test_the_defaults_are_those_users_and_job_templates_know() -> None:
    """The defaults live on the fields alone; these are the values users' scripts rely on."""
    broker, worker, node = BrokerConfig(bind="tcp://127.0.0.1:*"), WorkerConfig(), NodeConfig()
    assert (broker.max_attempts, broker.max_message_bytes, broker.drain_grace_s) == (3, 64 * 1024 * 1024, 10.0)
    assert (worker.grace_s, worker.prefetch, worker.transfer.chunk_bytes) == (20.0, 1, 1 << 20)
    assert (worker.heartbeats.interval_s, worker.heartbeats.liveness) == (2.0, 3)
    assert (node.idle_timeout_s, node.broker_deadline_s, node.exit_when_drained) == (600.0, 900.0, True)
    assert (ProduceRequest(claims="c", context=ModelChoice("m").spec()).batch_size, LocalRunConfig().workers) == (32, 2)
    assert (JobSpec(scheduler="slurm", broker="tcp://a:1").time_limit_s, WatchOptions().timeout_s) == (4 * 3600, 5.0)


@pytest.mark.parametrize(("command", "classes", "required", "given"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_with_no_flags_the_config_is_the_dataclass_default(command, classes, required, given) -> None:
    """Nothing restated: a flag not given leaves the field's own default."""
    import dataclasses

    args = build_parser(command).parse_args([command, *required])
    extra = {ProduceRequest: {"context": ModelChoice("m").spec()}, BrokerConfig: {"bind": "tcp://127.0.0.1:*"}}
    for cls in classes:
        own = {k: v for k, v in given.items() if k in {f.name for f in dataclasses.fields(cls)}}
        assert build_config(cls, args, **extra.get(cls, {})) == cls(**own, **extra.get(cls, {}))
    status = build_parser("status").parse_args(["status"])
    assert build_config(WatchOptions, status) == WatchOptions()


@pytest.mark.parametrize(("command", "classes", "required", "_"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_every_flag_reaches_its_field(command, classes, required, _) -> None:
    """Each flag given a value other than its default sets exactly its own field (through nested configs too)."""
    import dataclasses

    for cls in classes:
        for dest, opt, default in flagged_fields(cls):
            if default is dataclasses.MISSING or opt.choices or opt.parse is not None:
                continue
            if isinstance(default, bool) or opt.const is not None:
                argv = [opt.flag]
            else:
                value = {int: "7", float: "7.5", str: "x", tuple: "x"}.get(type(default), "7")
                argv = [opt.flag, value]
            args = build_parser(command).parse_args([command, *required, *argv])
            assert dest in vars(args), (command, opt.flag)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["broker", "--max-attempts", "0"], "--max-attempts must be at least 1"),
        (["broker", "--max-message-bytes", "65536"], "--max-message-bytes must be at least 524288"),
        (["broker", "--drain-grace", "-1"], "--drain-grace must be 0 or more"),
        (["broker", "--heartbeat-liveness", "0"], "--heartbeat-liveness must be at least 1"),
        (["worker", "--grace-seconds", "-1"], "--grace-seconds must be positive"),
        (["worker", "--heartbeat-interval", "0"], "--heartbeat-interval must be positive"),
        (["worker", "--cache-size-gb", "0"], "--cache-size-gb must be positive"),
        (["worker", "--credit", "0"], "--credit must be at least 1"),
        (["sink", "--out", "o", "--roll-seconds", "0"], "--roll-seconds must be positive"),
        (["produce", "--claims", "c", "--model", "m", "--max-unacked", "0"], "--max-unacked must be at least 1"),
        (["run", "--workers", "0"], "--workers must be at least 1"),
        (["status", "--timeout", "0"], "--timeout must be positive"),
        (["node", "--expect-gpus", "-1"], "--expect-gpus must be 0 or more"),
        (["node", "--", "--prefetch", "2000"], "--prefetch must be between 0 and 1023"),
        (["submit", "--scheduler", "slurm", "--broker", "tcp://a:1", "--broker-deadline", "0"],
         "--broker-deadline must be positive"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_flag(argv: list[str], flag: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pervade {argv[0]}: error: ") and flag in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_run_passes_the_claims_reading_options_on_to_its_producer() -> None:
    args = build_parser("run").parse_args(["run", "--label-field", "", "--split", "dev", "--skip-invalid"])
    reading = {name: getattr(args, name) for name in ("label_field", "split", "skip_invalid")}
    assert to_argv(ProduceRequest, reading) == ["--label-field", "", "--split", "dev", "--skip-invalid"]
