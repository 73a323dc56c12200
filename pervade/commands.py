"""The role subcommands of ``pervade`` (broker, worker, produce, sink) and the tools beside them (status,
report, keys, tiny-model, smollm2). Each has an options function, which adds its config's options (declared on the
config's fields, see pervade/options.py) and the few that belong to no config, and a handler, which builds
the config from the parsed options and runs the component. Components are imported lazily: the CLI starts
fast, and ``pervade --help`` imports none of them."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pervade.collector import collect_garbage_rarely
from pervade.constants import DEFAULT_BROKER_CONNECT
from pervade.options import SECURITY_SECTION, add_config_options, build_config, section

if TYPE_CHECKING:
    from pervade.keys import ClientKeys


def add_logging(parser: argparse.ArgumentParser) -> None:
    """The logging options every subcommand has (they belong to no config)."""
    group = parser.add_argument_group("logging")
    group.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="lowest level logged (default: info)")  # fmt: skip
    fmt = group.add_mutually_exclusive_group()
    fmt.add_argument("--log-json", dest="log_json", action="store_const", const=True,
                     help="JSON lines (default when stderr is not a terminal)")  # fmt: skip
    fmt.add_argument("--log-console", dest="log_json", action="store_const", const=False,
                     help="readable lines (default on a terminal)")  # fmt: skip


def add_keys(parser: argparse.ArgumentParser, server: bool = False) -> None:
    """``--keys DIR``: the CURVE keys of a run (resolved with ``pervade.keys.keys_dir``)."""
    from pervade.keys import KEYS_ENV

    whose = (
        "the broker's key pair and authorized/ client keys"
        if server
        else "this client's key pair and the broker's public key"
    )
    help = f"keys directory from `pervade keys init`: {whose} (default: ${KEYS_ENV}; none: plain TCP)"
    section(parser, SECURITY_SECTION).add_argument(
        "--keys", dest="keys_dir", type=Path, default=None, metavar="DIR", help=help
    )


def client_keys(args: argparse.Namespace, role: str) -> ClientKeys | None:
    from pervade.keys import ClientKeys, keys_dir

    directory = keys_dir(args.keys_dir)
    return ClientKeys.load(directory, role) if directory is not None else None


def broker_options(parser: argparse.ArgumentParser) -> None:
    from pervade.broker.config import BrokerConfig

    add_config_options(parser, BrokerConfig)
    add_keys(parser, server=True)


def run_broker(args: argparse.Namespace) -> int:
    from pervade.broker.config import BrokerConfig
    from pervade.broker.server import run_broker
    from pervade.keys import keys_dir

    asyncio.run(run_broker(build_config(BrokerConfig, args, keys_dir=keys_dir(args.keys_dir))))
    return 0


def worker_options(parser: argparse.ArgumentParser) -> None:
    from pervade.gpuworker.config import WorkerConfig

    add_config_options(parser, WorkerConfig)
    add_keys(parser)


def run_worker(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from pervade.gpuworker.config import WorkerConfig
    from pervade.gpuworker.worker import run_worker

    hf_logging.disable_progress_bar()  # progress bars would flood batch-system logs
    return asyncio.run(run_worker(build_config(WorkerConfig, args, keys=client_keys(args, "worker"))))


def produce_options(parser: argparse.ArgumentParser) -> None:
    from pervade.producer.run import ModelChoice, ProduceRequest

    add_config_options(parser, ProduceRequest)
    add_config_options(parser, ModelChoice)
    add_keys(parser)


def run_produce(args: argparse.Namespace) -> int:
    # Hugging Face datasets imports torch, when it is installed, to share streaming datasets with torch's data
    # loaders: 3.7 s of CPU of a producer's 5.9 s start, for nothing a producer uses. USE_TORCH=0 (datasets'
    # own switch; a user's explicit value stands) keeps it out of this process, which starts no other.
    os.environ.setdefault("USE_TORCH", "0")
    from pervade.producer.claims import import_claims_reader
    from pervade.producer.run import ModelChoice, ProduceRequest, produce

    model = build_config(ModelChoice, args)
    # Every option is checked first, with the bare context; then the model's files are hashed (or downloaded)
    # and the claims reader imported, which block: here, before the event loop starts.
    request = build_config(ProduceRequest, args, context=model.spec(), keys=client_keys(args, "producer"))
    request = dataclasses.replace(request, context=model.resolve())
    import_claims_reader()
    collect_garbage_rarely()
    print(asyncio.run(produce(request)).describe())
    return 0


def sink_options(parser: argparse.ArgumentParser) -> None:
    from pervade.sinks.sink import SinkConfig

    add_config_options(parser, SinkConfig)
    add_keys(parser)


def run_sink(args: argparse.Namespace) -> int:
    from pervade.sinks.sink import SinkConfig, run_sink

    config = build_config(SinkConfig, args, keys=client_keys(args, "sink"))
    collect_garbage_rarely()
    asyncio.run(run_sink(config))
    return 0


def status_options(parser: argparse.ArgumentParser) -> None:
    from pervade.monitor import WatchOptions

    parser.add_argument(
        "--broker",
        default=DEFAULT_BROKER_CONNECT,
        metavar="ENDPOINT",
        help=f"the broker's ZeroMQ endpoint (default: {DEFAULT_BROKER_CONNECT})",
    )
    parser.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit (for scripts)")
    add_config_options(parser, WatchOptions)
    add_keys(parser)


def monitor_keys(args: argparse.Namespace) -> ClientKeys | None:
    """The keys to read the status with: every role may. The monitor's if the directory has them, else the
    first role's it holds (a directory made before the monitor role has the producer's; a client directory
    from ``pervade keys add`` holds one role's)."""
    from pervade.keys import ROLES, ClientKeys, keys_dir

    directory = keys_dir(args.keys_dir)
    if directory is None:
        return None
    order = ["monitor", "producer", "sink", "worker"]
    role = next((r for r in order if r in ROLES and (directory / f"{r}.key_secret").exists()), "monitor")
    return ClientKeys.load(directory, role)


def run_status(args: argparse.Namespace) -> int:
    from pervade.monitor import WatchOptions, show_status

    options = build_config(WatchOptions, args)
    asyncio.run(show_status(args.broker, monitor_keys(args), options, sys.stdout, as_json=args.json))
    return 0


def report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, metavar="DIR", help="a sink's --out directory")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of Markdown")
    parser.add_argument(
        "--report-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where plots and summary.md go (default: DIR.report beside the output)",
    )
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="write summary.md only")


def run_report(args: argparse.Namespace) -> int:
    import json

    from pervade.sinks.report import build_report, report_dir_for, to_markdown, write_report

    report = build_report(args.dir)
    write_report(report, args.report_dir or report_dir_for(args.dir), plots=args.plots)
    print(
        json.dumps(report.to_json(), indent=2) if args.json else to_markdown(report), end="" if not args.json else "\n"
    )
    return 0


def keys_init_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="directory to create the keys in")
    parser.add_argument(
        "--force", action="store_true", help="replace keys already there (clients holding the old ones are refused)"
    )


def run_keys_init(args: argparse.Namespace) -> int:
    from pervade.keys import init_keys

    for path in init_keys(args.dir, force=args.force):
        print(path)
    print(f"each client needs {args.dir / 'broker.key'} and its role's ROLE.key_secret (worker, producer, sink, "
          f"monitor); more keys: pervade keys add|list|revoke {args.dir}")  # fmt: skip
    return 0


def add_key_arguments(parser: argparse.ArgumentParser) -> None:
    from pervade.keys import ROLES

    parser.add_argument("dir", type=Path, metavar="DIR", help="the keys directory (from `pervade keys init`)")
    parser.add_argument("role", metavar="ROLE", help=f"what the key may do: {', '.join(ROLES)}")
    parser.add_argument("name", metavar="NAME", help="the key's name: letters, digits, '_', '.', '-' (at most 64)")


def keys_add_options(parser: argparse.ArgumentParser) -> None:
    add_key_arguments(parser)
    parser.add_argument(
        "--public",
        type=Path,
        default=None,
        metavar="FILE",
        help="admit this public key (a ZeroMQ certificate made elsewhere) instead of making a key pair",
    )


def run_keys_add(args: argparse.Namespace) -> int:
    from pervade.keyadmin import add_key

    added = add_key(args.dir, args.role, args.name, public_file=args.public)
    print(f"admitted {added.holder} ({added.holder.public[:8]}): {added.file}")
    if added.removed is not None and added.bundle is None:
        print(f"removed {added.removed}: the client keys of the key revoked under that name")
    if added.bundle is not None:
        print(f"give {added.bundle}/ to that {added.holder.role} only; it runs with --keys {added.bundle}")
    return 0


def keys_list_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, metavar="DIR", help="the keys directory (from `pervade keys init`)")


def run_keys_list(args: argparse.Namespace) -> int:
    """The admitted keys as a table, then the files that admit nobody; exit status 1 when there are any."""
    from pervade.keyadmin import list_keys

    listed, problems = list_keys(args.dir)
    rows = [("ROLE", "NAME", "KEY", "FILE")]
    rows += [(k.holder.role.value, k.holder.name, k.holder.public[:8], str(k.file)) for k in listed]
    width = max(len(name) for _, name, _, _ in rows)
    for role, name, key, file in rows:
        print(f"{role:<8}  {name:<{width}}  {key:<8}  {file}")
    if not listed:
        print(f"no key is admitted: a keyed broker refuses every client (pervade keys add {args.dir} ROLE NAME)")
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0


def keys_revoke_options(parser: argparse.ArgumentParser) -> None:
    add_key_arguments(parser)


def run_keys_revoke(args: argparse.Namespace) -> int:
    from pervade.keyadmin import client_dir, revoke_key

    for path in revoke_key(args.dir, args.role, args.name):
        print(f"removed {path}")
    print(f"revoked {args.role}/{args.name}: a running broker cuts every connection of this key within 2 s")
    print(f"rows already written name it {args.name!r}: give the next {args.role} key another name, so they stay apart")
    bundle = client_dir(args.dir, args.role, args.name)
    if bundle.exists():
        print(f"its client keys stay in {bundle}/ (the secret admits nothing now): delete them when you like")
    return 0


def tiny_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="directory to write")
    parser.add_argument(
        "--size",
        default="tiny",
        choices=["tiny", "small", "medium", "smollm2-135m", "smollm2-1.7b"],
        help="shape (default: tiny)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def run_tiny_model(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from pervade.tinymodel import build_tiny_model

    hf_logging.disable_progress_bar()
    path = build_tiny_model(args.dir, size=args.size, seed=args.seed)
    print(f"wrote a {args.size} SmolLM2-architecture model to {path}")
    return 0


def smollm2_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                        help="pervade's model cache (default: $XDG_CACHE_HOME/pervade, else ~/.cache/pervade)")  # fmt: skip


def run_smollm2(args: argparse.Namespace) -> int:
    from pervade.smollm2 import ensure_smollm2

    print(ensure_smollm2(args.cache_dir))  # the path alone on stdout: `--model "$(pervade smollm2)"`
    return 0
