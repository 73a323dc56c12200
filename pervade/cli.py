"""``pervade``: one command, a subcommand per role. Each subcommand only parses options into a component's
config object and runs it; the components themselves know nothing of the command line."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pervade.constants import DEFAULT_BROKER_BIND, DEFAULT_BROKER_CONNECT
from pervade.context import DTYPES
from pervade.errors import ConfigError, InputError, JobFailed, PervadeError
from pervade.logs import configure_logging

if TYPE_CHECKING:
    from pervade.keys import ClientKeys
    from pervade.session import Heartbeats


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _prefetch(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 1023:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1023, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _add_logging(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="lowest level logged (default: info)")
    fmt = group.add_mutually_exclusive_group()
    fmt.add_argument("--log-json", dest="log_json", action="store_const", const=True, help="JSON lines (default when stderr is not a terminal)")
    fmt.add_argument("--log-console", dest="log_json", action="store_const", const=False, help="readable lines (default on a terminal)")


def _add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None, help="no progress bars, even on a terminal (default: bars on stderr when it is a terminal)")


def _add_heartbeats(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("liveness (use the same values on the broker and every client)")
    group.add_argument("--heartbeat-interval", type=_positive_float, default=2.0, metavar="SECONDS", help="seconds between heartbeats (default: 2)")
    group.add_argument("--heartbeat-liveness", type=_positive_int, default=3, metavar="N", help="missed heartbeats after which the other side is declared dead (default: 3)")


def _heartbeats(args: argparse.Namespace) -> Heartbeats:
    from pervade.session import Heartbeats  # lazily, like every component: the CLI starts fast

    return Heartbeats(interval_s=args.heartbeat_interval, liveness=args.heartbeat_liveness)


def _add_context_mode(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context-mode", default="full", choices=["full", "partial", "agnostic"], help="full: keep the model resident; partial: cache the files on the node, rebuild the model per batch; agnostic: load from the origin per batch (default: full)")


def _add_context_files(parser: argparse.ArgumentParser) -> None:
    _add_context_mode(parser)
    group = parser.add_argument_group("model files (node cache and peer transfer)")
    group.add_argument("--cache-dir", type=Path, default=None, help="node-local cache of model files (default: $SLURM_TMPDIR, $_CONDOR_SCRATCH_DIR or $TMPDIR, else ~/.cache/pervade/files)")
    group.add_argument("--cache-size-gb", type=_positive_float, default=None, help="evict least recently used model files beyond this size (default: unbounded)")
    group.add_argument("--no-serve-files", dest="serve_files", action="store_false", help="do not serve cached model files to peers")
    group.add_argument("--file-host", default=None, help="host name or address peers reach this worker's file service at (default: this node's host name)")
    group.add_argument("--file-bind-host", default="*", help="interface the file service binds (default: all)")
    group.add_argument("--max-uploads", type=_positive_int, default=4, help="peers served at once (default: 4)")
    group.add_argument("--chunk-kib", type=_positive_int, default=1024, help="KiB per chunk request (default: 1024)")
    group.add_argument("--credit", type=_positive_int, default=8, help="chunk requests in flight per peer (default: 8)")
    group.add_argument("--peer-timeout", type=_positive_float, default=10.0, help="give up a peer silent for this many seconds (default: 10)")


def _add_ending(parser: argparse.ArgumentParser) -> None:
    """When a worker ends on its own (batch jobs: no GPU held idle, no job stuck on a dead broker)."""
    group = parser.add_argument_group("ending on its own (batch jobs)")
    group.add_argument("--exit-when-drained", action="store_true", help="leave when the broker says every job is done")
    group.add_argument("--idle-timeout", type=_positive_float, default=None, metavar="SECONDS", help="leave after this long without work (default: never)")
    group.add_argument("--broker-deadline", type=_positive_float, default=None, metavar="SECONDS", help="exit with status 3 if the broker is not heard for this long, from the start for a broker not up yet (default: retry for ever)")


def _add_node_options(parser: argparse.ArgumentParser) -> None:
    from pervade.jobs.node import DEFAULT_BROKER_DEADLINE_S, DEFAULT_IDLE_TIMEOUT_S

    group = parser.add_argument_group("the job's workers")
    group.add_argument("--idle-timeout", type=_positive_float, default=DEFAULT_IDLE_TIMEOUT_S, metavar="SECONDS", help=f"workers leave after this long without work (default: {DEFAULT_IDLE_TIMEOUT_S:g})")
    group.add_argument("--broker-deadline", type=_positive_float, default=DEFAULT_BROKER_DEADLINE_S, metavar="SECONDS", help=f"workers give up on a broker not heard for this long, e.g. not up yet (default: {DEFAULT_BROKER_DEADLINE_S:g})")
    group.add_argument("--cache-dir", type=Path, default=None, help="node cache of model files, shared by the node's workers (default: the job's scratch dir)")
    group.add_argument("--stay-after-drained", dest="exit_when_drained", action="store_false", help="do not leave when the broker says every job is done (runs of several sweeps with gaps); only --idle-timeout ends the workers")


def _add_keys(parser: argparse.ArgumentParser, server: bool = False) -> None:
    from pervade.keys import KEYS_ENV

    group = parser.add_argument_group("security (CURVE)")
    whose = "the broker's key pair and authorized/ client keys" if server else "this client's key pair and the broker's public key"
    group.add_argument("--keys", type=Path, default=None, metavar="DIR", help=f"keys directory from `pervade keys init`: {whose} (default: ${KEYS_ENV}; none: plain TCP)")
    if server:
        group.add_argument("--insecure", action="store_true", help="listen on a network address without keys: anyone who reaches it can submit, take work and read verdicts")


def _client_keys(args: argparse.Namespace, role: str) -> ClientKeys | None:
    from pervade.keys import ClientKeys, keys_dir

    directory = keys_dir(args.keys)
    return ClientKeys.load(directory, role) if directory is not None else None


def _add_broker_endpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", default=DEFAULT_BROKER_CONNECT, metavar="ENDPOINT", help=f"the broker's ZeroMQ endpoint (default: {DEFAULT_BROKER_CONNECT})")


def _add_model(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("model (the context)")
    group.add_argument("--model", required=required, metavar="ID_OR_DIR", help="a Hugging Face hub id (e.g. HuggingFaceTB/SmolLM2-1.7B-Instruct) or a local model directory" + ("" if required else "; default: the offline tiny model (built on first use)"))
    group.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of the model")
    group.add_argument("--dtype", default="auto", choices=DTYPES, help="weights dtype; auto: what each worker's device does best, bf16 on recent GPUs, fp16 on older ones, fp32 on a CPU (default: auto)")


def _add_claims(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("claims")
    group.add_argument("--claims", required=required, metavar="PATH_OR_HUB_NAME", help="a local .jsonl/.json/.csv/.parquet file or a hub dataset name" + ("" if required else "; default: the small claims file shipped with pervade"))
    group.add_argument("--templates", type=Path, default=None, metavar="FILE", help="JSON object of template id -> text with one {claim} (default: the shipped set)")
    group.add_argument("--limit", type=_positive_int, default=None, help="read at most this many claims")
    group.add_argument("--batch-size", type=_positive_int, default=32, help="claims per batch; each batch has one template (default: 32)")
    group.add_argument("--id-field", default="id", help="record field holding the claim id (default: id)")
    group.add_argument("--claim-field", default="claim", help="record field holding the claim text (default: claim)")
    group.add_argument("--label-field", default="label", help="record field holding the gold label; '' for none (default: label)")
    group.add_argument("--split", default="train", help="split of a hub dataset (default: train)")
    group.add_argument("--dataset-config", default=None, help="configuration (subset) of a hub dataset")
    group.add_argument("--skip-invalid", action="store_true", help="skip and count records without a usable id or claim, instead of failing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pervade",
        description="High-throughput LLM fact verification on opportunistic GPUs, with the model kept resident on the workers.",
        epilog="Run 'pervade SUBCOMMAND --help' for a subcommand's options. Docs: docs/architecture.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("broker", help="run the broker (on a login node)", description="Queue claim batches per context, hand them to workers by affinity, route verdicts to sinks.")
    p.add_argument("--bind", default=DEFAULT_BROKER_BIND, metavar="ENDPOINT", help=f"ZeroMQ endpoint to bind; tcp://HOST:* picks a free port (default: {DEFAULT_BROKER_BIND})")
    p.add_argument("--endpoint-file", type=Path, default=None, help="write the endpoint actually bound to this file")
    p.add_argument("--max-message-bytes", type=_positive_int, default=64 * 1024 * 1024, help="drop peers sending larger frames (default: 64 MiB)")
    p.add_argument("--max-attempts", type=_positive_int, default=3, help="a batch failing this many times is recorded as failed (default: 3)")
    p.add_argument("--rebalance-backlog", type=_positive_int, default=8, help="queued batches per host at which an idle worker switches context (default: 8)")
    p.add_argument("--max-uploads-per-peer", type=_positive_int, default=4, help="model-file downloads sent to one worker at once (default: 4)")
    p.add_argument("--max-sources", type=_positive_int, default=4, help="peers a bootstrapping worker fetches model files from in parallel (default: 4)")
    p.add_argument("--state", type=Path, default=None, metavar="DIR", help="keep the broker's state (queued work, jobs, results) in DIR, so a restarted broker resumes where it stopped (default: a temporary directory, lost with the broker)")
    p.add_argument("--drain-grace", type=_non_negative_float, default=10.0, metavar="SECONDS", help="tell workers the run is over (batch jobs then end) once every job has been complete for this long and no producer is preparing one (default: 10)")
    p.add_argument("--fsync", action="store_true", help="fsync every commit of the state: survives a power failure of the node, not only a killed broker (slower)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics; 0 picks a free port, logged as metrics_listening (default: none)")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST", help="interface the metrics server listens on; 0.0.0.0 for a scraper on another host (default: 127.0.0.1)")
    _add_heartbeats(p)
    _add_keys(p, server=True)
    _add_logging(p)
    p.set_defaults(handler=_cmd_broker)

    p = sub.add_parser("worker", help="run a GPU worker (in a batch job)", description="Load contexts when told, keep them resident, and score the batches pulled from the broker.")
    _add_broker_endpoint(p)
    p.add_argument("--device", default="auto", help="auto (first visible GPU, else CPU), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--prefetch", type=_prefetch, default=1, help="batches held beyond the one computing (default: 1)")
    p.add_argument("--max-contexts", type=_positive_int, default=1, help="contexts kept resident at once (default: 1)")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--worker-id", default=None, help="name in logs and output rows; one live worker holds it, a second is refused (default: HOST-PID)")
    _add_context_files(p)
    p.add_argument("--grace-seconds", type=_positive_float, default=20.0, help="on SIGTERM, exit within this many seconds: queued batches are handed back at once, the one in hand is finished only if it fits (default: 20; Slurm sends SIGKILL 30 s after SIGTERM by default)")
    _add_ending(p)
    _add_progress(p)
    _add_heartbeats(p)
    _add_keys(p)
    _add_logging(p)
    p.set_defaults(handler=_cmd_worker)

    p = sub.add_parser("produce", help="stream claims x templates into the broker", description="Send every (claim, template) pair for one model to the broker, with backpressure.")
    _add_broker_endpoint(p)
    _add_claims(p, required=True)
    _add_model(p, required=True)
    p.add_argument("--max-unacked", type=_positive_int, default=16, help="batches in flight without the broker's acknowledgement (default: 16)")
    p.add_argument("--job-id", default=None, help="job id (default: a hash of what the sweep computes: the claims' content, the templates, the model and the batch size, so an unchanged re-run is recognised and a changed file is a new job)")
    p.add_argument("--wait", action="store_true", help="return only when every pair is durably written by a sink or recorded as failed; exit 1 if any failed")
    p.add_argument("--timeout", type=_positive_float, default=None, help="give up (exit 1) if submitting, and waiting with --wait, takes longer than this many seconds")
    _add_progress(p)
    _add_heartbeats(p)
    _add_keys(p)
    _add_logging(p)
    p.set_defaults(handler=_cmd_produce)

    p = sub.add_parser("sink", help="write verdicts to Parquet", description="Receive results from the broker and write them to Parquet files in a directory.")
    _add_broker_endpoint(p)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--row-group-rows", type=_positive_int, default=10_000, help="rows per Parquet row group (default: 10000)")
    p.add_argument("--file-rows", type=_positive_int, default=1_000_000, help="rows per file before it is closed (default: 1000000)")
    p.add_argument("--roll-seconds", type=_positive_float, default=2.0, help="longest a result waits before its file is closed and acknowledged (default: 2)")
    p.add_argument("--idle-roll-seconds", type=_positive_float, default=0.5, help="close the file once no result has come for this long (default: 0.5)")
    p.add_argument("--sink-id", default=None, help="name in file names and logs; one live sink holds it: a restarted sink with the same name takes over once the old one is silent for a heartbeat liveness (default: random)")
    p.add_argument("--until-done", action="store_true", help="exit once the broker reports every job complete")
    _add_progress(p)
    _add_heartbeats(p)
    _add_keys(p)
    _add_logging(p)
    p.set_defaults(handler=_cmd_sink)

    p = sub.add_parser("run", help="run the whole pipeline on this machine", description="Start a broker, N workers, a producer and a sink as separate processes, run the job to completion, and print a summary. With no flags it runs offline on shipped claims and a tiny model.")
    _add_claims(p, required=False)
    _add_model(p, required=False)
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="output directory (default: pervade-out/run-TIMESTAMP)")
    p.add_argument("--overwrite", action="store_true", help="replace Parquet files already in --out")
    p.add_argument("--workers", type=_positive_int, default=2, help="worker processes (default: 2)")
    p.add_argument("--device", default="auto", help="workers' device: auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--threads-per-worker", type=_positive_int, default=None, help="CPU threads per worker (default: cores / workers)")
    _add_context_mode(p)
    p.add_argument("--cache-dir", type=Path, default=None, help="workers' node cache of model files (default: theirs)")
    _add_logging(p)
    p.set_defaults(handler=_cmd_run)

    p = sub.add_parser("status", help="show the run live: workers, queues, progress, ETA", description="Ask the broker for a snapshot of the run and show it, refreshed in place like top; once, as text, when stdout is not a terminal. Uses the monitor key (else the producer key) of --keys.")
    _add_broker_endpoint(p)
    p.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit (for scripts)")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit, even on a terminal")
    p.add_argument("--interval", type=_positive_float, default=2.0, metavar="SECONDS", help="seconds between refreshes (default: 2)")
    p.add_argument("--timeout", type=_positive_float, default=5.0, metavar="SECONDS", help="give up on a broker silent for this long (default: 5)")
    _add_keys(p)
    _add_logging(p)
    p.set_defaults(handler=_cmd_status)

    p = sub.add_parser("report", help="accuracy per template, confusion matrices, plots, from a run's Parquet output", description="Read the Parquet files in DIR and report, per context and template, accuracy against the gold labels, macro-F1, the confusion matrix and verdict counts, and the best template; write plots and summary.md to DIR.report/.")
    p.add_argument("dir", type=Path, metavar="DIR", help="a sink's --out directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of Markdown")
    p.add_argument("--report-dir", type=Path, default=None, metavar="DIR", help="where plots and summary.md go (default: DIR.report beside the output)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="write summary.md only")
    _add_logging(p)
    p.set_defaults(handler=_cmd_report)

    p = sub.add_parser("submit", help="submit worker jobs to Slurm, HTCondor or Grid Engine", description="Render a worker job from a template (jobs/templates/) and submit it N times as one array with the scheduler's own command; prints the job ids. Options after -- are passed to every worker.")
    p.add_argument("--scheduler", required=True, choices=["slurm", "htcondor", "sge"], help="the batch system")
    p.add_argument("--broker", required=True, metavar="ENDPOINT", help="the broker's endpoint as compute nodes reach it, e.g. tcp://login1:5555")
    p.add_argument("--workers", type=_positive_int, default=1, help="jobs to submit (default: 1)")
    p.add_argument("--gpus-per-job", type=int, default=1, help="GPUs per job, one worker each; 0 for a CPU job (default: 1)")
    p.add_argument("--cpus-per-job", type=_positive_int, default=4, help="CPU cores per job (default: 4)")
    p.add_argument("--memory", default="16G", help="memory per job, in the scheduler's syntax; '' for the site default (default: 16G)")
    p.add_argument("--time", default="4:00:00", help="wall-clock limit: minutes, HH:MM:SS or D-HH:MM:SS; '' for the site default (default: 4:00:00)")
    p.add_argument("--partition", default="", help="Slurm partition or Grid Engine queue")
    p.add_argument("--account", default="", help="Slurm account, Grid Engine project or HTCondor accounting group")
    p.add_argument("--job-name", default="pervade-worker", help="job name (default: pervade-worker)")
    p.add_argument("--extra", action="append", default=[], metavar="LINE", help="a scheduler line added verbatim; one starting with - gets the directive prefix, written with = as in --extra=--constraint=a100 (repeatable)")
    p.add_argument("--setup", action="append", default=[], metavar="LINE", help="a shell line run before the worker, e.g. 'module load cuda' (repeatable)")
    p.add_argument("--venv", type=Path, default=None, help="a virtual environment to activate on the node (default: run this Python, with its environment)")
    p.add_argument("--python", default=None, help="the Python on the compute nodes (default: this one)")
    p.add_argument("--log-dir", type=Path, default=Path("pervade-jobs"), help="where the jobs' output and rendered scripts go (default: ./pervade-jobs)")
    p.add_argument("--requeue", action="store_true", help="let the scheduler requeue a preempted job")
    p.add_argument("--template", type=Path, default=None, help="a copy of the scheduler's template in jobs/templates/ to render instead")
    p.add_argument("--dry-run", action="store_true", help="print the rendered job and submit nothing")
    _add_node_options(p)
    _add_logging(p)
    p.set_defaults(handler=_cmd_submit, worker_args=[])

    p = sub.add_parser("node", help="run one batch job's workers (what a submitted job runs)", description="Start one worker per GPU in CUDA_VISIBLE_DEVICES (or one CPU worker), pass the batch system's signals on, and end when the workers end. Options after -- are passed to every worker.")
    _add_broker_endpoint(p)
    p.add_argument("--job-id", default="", help="the batch system's job id, to name the workers JOB-gpuK (default: HOST-PID)")
    p.add_argument("--gpus", default=None, help="GPUs to use, overriding CUDA_VISIBLE_DEVICES; '' for one CPU worker")
    p.add_argument("--worker-log-dir", type=Path, default=None, help="write each worker's log to DIR/WORKER.log (default: the job's output)")
    p.add_argument("--expect-gpus", type=int, default=0, help="GPUs the job asked for; fewer visible is logged as a warning (default: 0)")
    _add_node_options(p)
    _add_logging(p)
    p.set_defaults(handler=_cmd_node, worker_args=[])

    p = sub.add_parser("keys", help="create the CURVE keys of a run", description="CURVE keys: the broker's key pair, one per client role (worker, producer, sink, monitor), and the directory of client public keys the broker admits (docs/security.md).")
    keys_sub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = keys_sub.add_parser("init", help="create the broker's and the client roles' key pairs in DIR", description="Write DIR/broker.key(_secret) and DIR/ROLE.key(_secret) for ROLE in worker, producer, sink, monitor (secrets mode 0600), and authorise the roles in DIR/authorized/.")
    k.add_argument("dir", type=Path, help="directory to create the keys in")
    k.add_argument("--force", action="store_true", help="replace keys already there (clients holding the old ones are refused)")
    _add_logging(k)
    k.set_defaults(handler=_cmd_keys_init)

    p = sub.add_parser("tiny-model", help="write a tiny random SmolLM2-architecture model", description="Write a randomly initialised LlamaForCausalLM of SmolLM2's architecture and a locally trained tokenizer, for offline runs and tests.")
    p.add_argument("dir", type=Path, help="directory to write")
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "medium", "smollm2-135m", "smollm2-1.7b"], help="shape (default: tiny)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    _add_logging(p)
    p.set_defaults(handler=_cmd_tiny_model)
    return parser


def _cmd_broker(args: argparse.Namespace) -> int:
    from pervade.broker.server import BrokerConfig, run_broker
    from pervade.keys import keys_dir

    config = BrokerConfig(
        bind=args.bind,
        endpoint_file=args.endpoint_file,
        max_message_bytes=args.max_message_bytes,
        max_attempts=args.max_attempts,
        rebalance_backlog=args.rebalance_backlog,
        max_uploads_per_peer=args.max_uploads_per_peer,
        max_sources=args.max_sources,
        state_dir=args.state,
        fsync=args.fsync,
        drain_grace_s=args.drain_grace,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        keys_dir=keys_dir(args.keys),
        insecure=args.insecure,
        heartbeats=_heartbeats(args),
    )
    asyncio.run(run_broker(config))
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from pervade.gpuworker.fetch import TransferConfig
    from pervade.gpuworker.fileserver import FileServiceConfig
    from pervade.gpuworker.worker import WorkerConfig, run_worker
    from pervade.context import ContextMode

    hf_logging.disable_progress_bar()  # progress bars would flood batch-system logs
    config = WorkerConfig(
        broker=args.broker,
        device=args.device,
        prefetch=args.prefetch,
        max_contexts=args.max_contexts,
        threads=args.threads,
        worker_id=args.worker_id,
        grace_s=args.grace_seconds,
        heartbeats=_heartbeats(args),
        context_mode=ContextMode(args.context_mode),
        cache_dir=args.cache_dir,
        cache_limit_bytes=int(args.cache_size_gb * 1e9) if args.cache_size_gb else None,
        serve_files=args.serve_files,
        files=FileServiceConfig(bind_host=args.file_bind_host, advertise_host=args.file_host, max_uploads=args.max_uploads),
        transfer=TransferConfig(chunk_bytes=args.chunk_kib * 1024, credit=args.credit, peer_timeout_s=args.peer_timeout),
        exit_when_drained=args.exit_when_drained,
        idle_timeout_s=args.idle_timeout,
        broker_deadline_s=args.broker_deadline,
        keys=_client_keys(args, "worker"),
        progress=args.progress,
    )
    return asyncio.run(run_worker(config))


def _cmd_produce(args: argparse.Namespace) -> int:
    from pervade.context import make_context
    from pervade.producer.run import ProduceRequest, produce

    request = ProduceRequest(
        broker=args.broker,
        claims=args.claims,
        templates=args.templates,
        context=make_context(args.model, args.revision, args.dtype),
        batch_size=args.batch_size,
        limit=args.limit,
        id_field=args.id_field,
        claim_field=args.claim_field,
        label_field=args.label_field or None,
        split=args.split,
        dataset_config=args.dataset_config,
        skip_invalid=args.skip_invalid,
        max_unacked=args.max_unacked,
        job_id=args.job_id,
        wait=args.wait,
        timeout_s=args.timeout,
        heartbeats=_heartbeats(args),
        keys=_client_keys(args, "producer"),
        progress=args.progress,
    )
    outcome = asyncio.run(produce(request))
    print(outcome.describe())
    return 0


def _cmd_sink(args: argparse.Namespace) -> int:
    from pervade.sinks.sink import SinkConfig, run_sink

    config = SinkConfig(
        out_dir=args.out,
        broker=args.broker,
        row_group_rows=args.row_group_rows,
        file_rows=args.file_rows,
        roll_seconds=args.roll_seconds,
        idle_roll_seconds=args.idle_roll_seconds,
        sink_id=args.sink_id,
        until_done=args.until_done,
        heartbeats=_heartbeats(args),
        keys=_client_keys(args, "sink"),
        progress=args.progress,
    )
    asyncio.run(run_sink(config))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from pervade.jobs.local import LocalRunConfig, format_result, run_local

    extra: list[str] = ["--id-field", args.id_field, "--claim-field", args.claim_field, "--label-field", args.label_field, "--split", args.split]
    if args.dataset_config:
        extra += ["--dataset-config", args.dataset_config]
    if args.skip_invalid:
        extra.append("--skip-invalid")
    config = LocalRunConfig(
        claims=args.claims,
        templates=args.templates,
        out_dir=args.out,
        overwrite=args.overwrite,
        workers=args.workers,
        model=args.model,
        revision=args.revision,
        dtype=args.dtype,
        device=args.device,
        limit=args.limit,
        batch_size=args.batch_size,
        threads_per_worker=args.threads_per_worker,
        context_mode=args.context_mode,
        cache_dir=args.cache_dir,
        log_level=args.log_level,
        extra_produce_args=tuple(extra),
    )
    if config.templates is not None:  # fail before any process starts
        from pervade.producer.templates import load_templates

        load_templates(config.templates)
    print(format_result(asyncio.run(run_local(config))))
    return 0


def _monitor_keys(args: argparse.Namespace) -> ClientKeys | None:
    """The monitor role's keys; a keys directory made before that role existed has the producer's."""
    from pervade.keys import ClientKeys, keys_dir

    directory = keys_dir(args.keys)
    if directory is None:
        return None
    role = "monitor" if (directory / "monitor.key_secret").exists() else "producer"
    return ClientKeys.load(directory, role)


def _cmd_status(args: argparse.Namespace) -> int:
    from pervade.monitor import WatchOptions, show_status

    options = WatchOptions(interval_s=args.interval, timeout_s=args.timeout, once=args.once)
    asyncio.run(show_status(args.broker, _monitor_keys(args), options, sys.stdout, as_json=args.json))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    import json

    from pervade.sinks.report import build_report, report_dir_for, to_markdown, write_report

    report = build_report(args.dir)
    write_report(report, args.report_dir or report_dir_for(args.dir), plots=args.plots)
    print(json.dumps(report.to_json(), indent=2) if args.json else to_markdown(report), end="" if not args.json else "\n")
    return 0


#: Worker options (their argparse dests) a batch job sets itself (``pervade node``): not to be passed after ``--``.
NODE_SETS = ("broker", "worker_id", "exit_when_drained", "idle_timeout", "broker_deadline", "cache_dir")


def _check_worker_args(worker_args: Sequence[str]) -> None:
    """Refuse worker options that would fail every job later: unknown ones, and the ones the node sets
    (compared after parsing, so an abbreviation such as ``--worker`` is caught too)."""
    try:
        parsed = build_parser().parse_args(["worker", *worker_args])
    except SystemExit:  # argparse has printed what is wrong
        raise ConfigError(f"invalid worker options after --: {shlex.join(worker_args)}") from None
    defaults = build_parser().parse_args(["worker"])
    taken = ["--" + dest.replace("_", "-") for dest in NODE_SETS if getattr(parsed, dest) != getattr(defaults, dest)]
    if taken:
        raise ConfigError(f"{', '.join(taken)}: set by the job itself; use the option before -- instead")


def _cmd_submit(args: argparse.Namespace) -> int:
    from pervade.jobs.submit import JobSpec, Scheduler, parse_duration, render, submit

    _check_worker_args(args.worker_args)
    setup = list(args.setup)
    if args.venv is not None:
        setup.insert(0, f"source {shlex.quote(str(args.venv.absolute() / 'bin' / 'activate'))}")
    node_options = ["--idle-timeout", f"{args.idle_timeout:g}", "--broker-deadline", f"{args.broker_deadline:g}",
                    "--expect-gpus", str(args.gpus_per_job)]  # fmt: skip
    if not args.exit_when_drained:
        node_options.append("--stay-after-drained")
    if args.cache_dir is not None:
        node_options += ["--cache-dir", str(args.cache_dir)]
    spec = JobSpec(
        scheduler=Scheduler(args.scheduler),
        broker=args.broker,
        workers=args.workers,
        gpus_per_job=args.gpus_per_job,
        cpus_per_job=args.cpus_per_job,
        memory=args.memory,
        time_limit_s=parse_duration(args.time) if args.time else 0,
        partition=args.partition,
        account=args.account,
        job_name=args.job_name,
        log_dir=args.log_dir,
        python=args.python or ("python" if args.venv is not None else sys.executable),
        setup_lines=tuple(setup),
        extra_lines=tuple(args.extra),
        requeue=args.requeue,
        node_options=tuple(node_options),
        worker_args=tuple(args.worker_args),
    )
    if args.dry_run:
        print(render(spec, args.template).show(), end="")
        return 0
    for job_id in submit(spec, args.template):
        print(job_id)
    return 0


def _cmd_node(args: argparse.Namespace) -> int:
    from pervade.jobs.node import NodeConfig, run_node

    _check_worker_args(args.worker_args)
    config = NodeConfig(
        broker=args.broker,
        job_id=args.job_id,
        worker_args=tuple(args.worker_args),
        cache_dir=args.cache_dir,
        idle_timeout_s=args.idle_timeout,
        broker_deadline_s=args.broker_deadline,
        log_dir=args.worker_log_dir,
        gpus=args.gpus,
        expect_gpus=args.expect_gpus,
        exit_when_drained=args.exit_when_drained,
    )
    return asyncio.run(run_node(config))


def _cmd_keys_init(args: argparse.Namespace) -> int:
    from pervade.keys import init_keys

    for path in init_keys(args.dir, force=args.force):
        print(path)
    print(f"each client needs {args.dir / 'broker.key'} and its role's ROLE.key_secret (worker, producer, sink, monitor); "
          f"grant or revoke keys in {args.dir / 'authorized'}")  # fmt: skip
    return 0


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from pervade.tinymodel import build_tiny_model

    hf_logging.disable_progress_bar()
    path = build_tiny_model(args.dir, size=args.size, seed=args.seed)
    print(f"wrote a {args.size} SmolLM2-architecture model to {path}")
    return 0


#: Subcommands whose options after ``--`` go to every worker they start.
PASSES_ARGS_ON = ("submit", "node")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passed_on: list[str] = []
    if argv and argv[0] in PASSES_ARGS_ON and "--" in argv:  # `pervade node ... -- WORKER OPTIONS`
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
        print(f"pervade {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except JobFailed as exc:
        print(f"pervade {args.command}: job failed: {exc}", file=sys.stderr)
        return 1
    except PervadeError as exc:
        print(f"pervade {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file or directory the command needs: say which, without a traceback
        print(f"pervade {args.command}: error: {exc}", file=sys.stderr)
        return 1
