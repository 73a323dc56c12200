"""The subcommands that start other pervade processes: ``run`` (the whole pipeline on this machine), ``submit``
(worker jobs for a batch system) and ``node`` (what such a job runs). ``submit`` and ``node`` pass the
options after ``--`` on to every worker; they are checked here, so that a typo fails now, not in every job."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shlex
from collections.abc import Sequence
from pathlib import Path

from pervade.errors import ConfigError
from pervade.options import add_config_options, build_config, flag_of, to_argv

#: Worker options a batch job sets itself (``pervade node``): not to be passed after ``--``.
NODE_SETS = ("broker", "worker_id", "exit_when_drained", "idle_timeout_s", "broker_deadline_s", "cache_dir")


def run_options(parser: argparse.ArgumentParser) -> None:
    from pervade.jobs.local import LocalRunConfig
    from pervade.producer.run import READING_OPTIONS, ProduceRequest

    add_config_options(parser, LocalRunConfig)
    add_config_options(parser, ProduceRequest, only=READING_OPTIONS)


def run_here(args: argparse.Namespace) -> int:
    from pervade.jobs.local import LocalRunConfig, format_result, run_local
    from pervade.producer.run import READING_OPTIONS, ProduceRequest

    reading = {name: getattr(args, name) for name in READING_OPTIONS if hasattr(args, name)}
    config = build_config(
        LocalRunConfig, args, log_level=args.log_level, extra_produce_args=tuple(to_argv(ProduceRequest, reading))
    )
    if config.templates is not None:  # fail before any process starts
        from pervade.producer.templates import load_templates

        load_templates(config.templates)
    print(format_result(asyncio.run(run_local(config))))
    return 0


def submit_options(parser: argparse.ArgumentParser) -> None:
    from pervade.jobs.node import JOB_OPTIONS, NodeConfig
    from pervade.jobs.submit import JobSpec

    add_config_options(parser, JobSpec)
    parser.add_argument(
        "--venv",
        type=Path,
        default=None,
        help="a virtual environment to activate on the node (default: run this Python, with its environment)",
    )
    parser.add_argument(
        "--template",
        type=Path,
        default=None,
        help="a copy of the scheduler's template in jobs/templates/ to render instead",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the rendered job and submit nothing")
    add_config_options(parser, NodeConfig, only=JOB_OPTIONS)
    parser.set_defaults(worker_args=[])


def run_submit(args: argparse.Namespace) -> int:
    from pervade.jobs.node import JOB_OPTIONS, NodeConfig
    from pervade.jobs.submit import JobSpec, render, submit

    check_worker_args(args.worker_args)
    setup = tuple(getattr(args, "setup_lines", ()))
    venv: dict[str, object] = {}
    if args.venv is not None:
        setup = (f"source {shlex.quote(str(args.venv.absolute() / 'bin' / 'activate'))}", *setup)
        venv["python"] = getattr(args, "python", "python")  # the venv's, unless named
    spec = build_config(JobSpec, args, setup_lines=setup, worker_args=tuple(args.worker_args), **venv)
    node = build_config(NodeConfig, args, only=JOB_OPTIONS, broker=spec.broker)
    job_options = to_argv(NodeConfig, {name: getattr(node, name) for name in JOB_OPTIONS})
    spec = dataclasses.replace(spec, node_options=(*job_options, "--expect-gpus", str(spec.gpus_per_job)))
    if args.dry_run:
        print(render(spec, args.template).show(), end="")
        return 0
    for job_id in submit(spec, args.template):
        print(job_id)
    return 0


def node_options(parser: argparse.ArgumentParser) -> None:
    from pervade.jobs.node import NodeConfig

    add_config_options(parser, NodeConfig)
    parser.set_defaults(worker_args=[])


def run_node_command(args: argparse.Namespace) -> int:
    from pervade.jobs.node import NodeConfig, run_node

    check_worker_args(args.worker_args)
    return asyncio.run(run_node(build_config(NodeConfig, args, worker_args=tuple(args.worker_args))))


def check_worker_args(worker_args: Sequence[str]) -> None:
    """Refuse worker options that would fail every job later: unknown ones, bad values, and the ones the node
    sets (compared after parsing, so an abbreviation such as ``--worker`` is caught too)."""
    from pervade.commands import add_logging, worker_options
    from pervade.gpuworker.config import WorkerConfig

    parser = argparse.ArgumentParser(prog="pervade worker")
    worker_options(parser)
    add_logging(parser)
    try:
        parsed = parser.parse_args(worker_args)
    except SystemExit:  # argparse has printed what is wrong
        raise ConfigError(f"invalid worker options after --: {shlex.join(worker_args)}") from None
    taken = [str(flag_of(WorkerConfig, name)) for name in NODE_SETS if name in vars(parsed)]
    if taken:
        raise ConfigError(f"{', '.join(taken)}: set by the job itself; use the option before -- instead")
    try:
        build_config(WorkerConfig, parsed)
    except ConfigError as exc:
        raise ConfigError(f"invalid worker options after --: {exc}") from None
