"""How a worker runs: every setting, its default and its check, in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pervade.context import ContextMode
from pervade.gpuworker.fetch import TransferConfig
from pervade.gpuworker.fileserver import FileServiceConfig
from pervade.keys import ClientKeys
from pervade.options import (
    FILES_SECTION,
    POSITIVE,
    at_least,
    between,
    broker_option,
    check_options,
    nested,
    option,
    progress_option,
)
from pervade.session import Heartbeats

#: The most batches a worker may hold beyond the one computing (a Credit's bound, less the one computing).
MAX_PREFETCH = 1023
#: Help sections of the worker's options.
ENDING_SECTION = "ending on its own (batch jobs)"


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker runs."""

    #: The broker's endpoint.
    broker: str = broker_option()
    #: ``auto`` (first visible GPU, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    device: str = option("auto", "auto (first visible GPU, else CPU), cpu, cuda or cuda:N", flag="--device")
    #: Batches held beyond the one computing, so the device never waits on the network.
    prefetch: int = option(
        1, "batches held beyond the one computing", flag="--prefetch", check=between(0, MAX_PREFETCH)
    )
    #: Contexts kept resident at once; the broker evicts the oldest when it asks for one more.
    max_contexts: int = option(1, "contexts kept resident at once", flag="--max-contexts", check=at_least(1))
    #: CPU threads for torch (None: torch's default). Several CPU workers on one node want fewer each.
    threads: int | None = option(
        None, "CPU threads for torch (default: torch's choice)", flag="--threads", check=at_least(1)
    )
    #: A name for logs and output rows; defaults to ``host-pid``.
    worker_id: str | None = option(
        None,
        "name in logs and output rows; one live worker holds it, a second is refused (default: HOST-PID)",
        flag="--worker-id",
    )
    #: Seconds from SIGTERM to exit: the batch in hand is finished only if it fits (batch systems send
    #: SIGKILL after a grace time: Slurm's KillWait is 30 s by default).
    grace_s: float = option(
        20.0,
        "on SIGTERM, exit within this many seconds: queued batches are handed back at once, the one in hand "
        "is finished only if it fits (Slurm sends SIGKILL 30 s after SIGTERM by default)",
        flag="--grace-seconds",
        check=POSITIVE,
    )
    heartbeats: Heartbeats = nested(Heartbeats)
    #: How long a context is kept (see ContextMode).
    context_mode: ContextMode = option(
        ContextMode.FULL,
        "full: keep the model resident; partial: cache the files on the node, rebuild the model per "
        "batch; agnostic: load from the origin per batch",
        flag="--context-mode",
        parse=ContextMode,
        choices=[mode.value for mode in ContextMode],
    )
    #: The node cache of model files (None: the batch system's scratch dir, see gpuworker/cache.py).
    cache_dir: Path | None = option(
        None,
        "node-local cache of model files (default: $SLURM_TMPDIR, $_CONDOR_SCRATCH_DIR or $TMPDIR, else "
        "~/.cache/pervade/files)",
        flag="--cache-dir",
        group=FILES_SECTION,
    )
    #: Largest size of the node cache in bytes (None: unbounded).
    cache_limit_bytes: int | None = option(
        None,
        "evict least recently used model files beyond this size (default: unbounded)",
        flag="--cache-size-gb",
        parse=float,
        unit=1e9,
        check=POSITIVE,
        group=FILES_SECTION,
    )
    #: Serve cached files to peers.
    serve_files: bool = option(
        True, "do not serve cached model files to peers", flag="--no-serve-files", group=FILES_SECTION
    )
    files: FileServiceConfig = nested(FileServiceConfig)
    transfer: TransferConfig = nested(TransferConfig)
    #: Leave when the broker says every job is done (batch jobs: no GPU held idle).
    exit_when_drained: bool = option(
        False, "leave when the broker says every job is done", flag="--exit-when-drained", group=ENDING_SECTION
    )
    #: Leave after this many seconds without work (None: never).
    idle_timeout_s: float | None = option(
        None,
        "leave after this long without work (default: never)",
        flag="--idle-timeout",
        metavar="SECONDS",
        check=POSITIVE,
        group=ENDING_SECTION,
    )
    #: Give up (exit status 3) when the broker has not been heard for this long, counting from the start
    #: for a broker not up yet (None: retry for ever).
    broker_deadline_s: float | None = option(
        None,
        "exit with status 3 if the broker is not heard for this long, from the start for a broker not up yet "
        "(default: retry for ever)",
        flag="--broker-deadline",
        metavar="SECONDS",
        check=POSITIVE,
        group=ENDING_SECTION,
    )
    #: CURVE keys for the broker connection (None: plain TCP).
    keys: ClientKeys | None = None
    #: Progress bars of model-file transfers and model loads on stderr; None: only when stderr is a terminal.
    progress: bool | None = progress_option()

    def __post_init__(self) -> None:
        check_options(self)  # the nested configs check themselves
