"""How the broker runs: every setting, its default and its check, in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pervade.broker.constants import DEFAULT_SLICE_CLAIMS
from pervade.constants import DEFAULT_BROKER_BIND, DEFAULT_MAX_MESSAGE_BYTES
from pervade.errors import ConfigError
from pervade.options import (
    NON_NEGATIVE,
    POSITIVE,
    SECURITY_SECTION,
    at_least,
    between,
    check_options,
    nested,
    option,
)
from pervade.protocol import GROUP_BYTES, MIN_MESSAGE_BYTES
from pervade.session import Heartbeats
from pervade.transport import is_loopback


@dataclass(frozen=True)
class BrokerConfig:
    """How the broker runs. Every field has a default that suits a small cluster."""

    #: ZeroMQ endpoint to bind; ``tcp://127.0.0.1:*`` picks a free port (see ``endpoint_file``).
    bind: str = option(
        DEFAULT_BROKER_BIND,
        "ZeroMQ endpoint to bind; tcp://HOST:* picks a free port",
        flag="--bind",
        metavar="ENDPOINT",
    )
    #: Where to write the endpoint actually bound, for launchers that asked for a free port.
    endpoint_file: Path | None = option(None, "write the endpoint actually bound to this file", flag="--endpoint-file")
    #: Frames larger than this make libzmq drop the sender's connection. At least ``MIN_MESSAGE_BYTES``: peers
    #: send a group of messages as one frame of up to ``GROUP_BYTES`` (pervade/protocol.py).
    max_message_bytes: int = option(
        DEFAULT_MAX_MESSAGE_BYTES, f"drop peers sending larger frames (at least {MIN_MESSAGE_BYTES}: peers send "
        f"groups of messages as frames of up to {GROUP_BYTES // 1024} KiB)", flag="--max-message-bytes",
        check=at_least(MIN_MESSAGE_BYTES),
    )
    #: A batch that fails this many times (or whose worker dies this many times) is recorded as failed.
    max_attempts: int = option(3, "a batch failing this many times is recorded as failed", flag="--max-attempts",
                               check=at_least(1))  # fmt: skip
    #: Small batches a producer submits together (same job, context, template and time) travel as one *slice* of up to
    #: this many claims: one row, assignment, result and delivery instead of one per batch (``BrokerStore.add``).
    slice_claims: int = option(
        DEFAULT_SLICE_CLAIMS, "claims a slice of small batches holds at most: submitted together, they travel as "
        "one; each keeps its id and rows (0: every batch travels alone)", flag="--slice-claims",
        check=between(0, 4096),
    )  # fmt: skip
    #: Queued batches per host at which an idle worker leaves its context for another (see policy.py).
    rebalance_backlog: int = option(
        8,
        "queued batches per host at which an idle worker switches context",
        flag="--rebalance-backlog",
        check=at_least(1),
    )
    #: Downloads of model files the broker sends to one worker at once (see broker/sources.py).
    max_uploads_per_peer: int = option(
        4, "model-file downloads sent to one worker at once", flag="--max-uploads-per-peer", check=at_least(1)
    )
    #: Peers a bootstrapping worker fetches from in parallel.
    max_sources: int = option(
        4, "peers a bootstrapping worker fetches model files from in parallel", flag="--max-sources", check=at_least(1)
    )
    #: Directory of the durable state; None keeps it in a temporary directory that dies with the broker.
    state_dir: Path | None = option(
        None, "keep the broker's state (queued work, jobs, results) in DIR, so a restarted broker resumes where "
        "it stopped (default: a temporary directory, lost with the broker)", flag="--state", metavar="DIR",
    )  # fmt: skip
    #: fsync every commit (survives a power failure of the node, not only a killed broker).
    fsync: bool = option(
        False,
        "fsync every commit of the state: survives a power failure of the node, not only a killed broker (slower)",
        flag="--fsync",
    )
    #: Heartbeat interval and liveness; clients should use the same values.
    heartbeats: Heartbeats = nested(Heartbeats)
    #: How often the store's write-ahead log is checkpointed (on a thread).
    checkpoint_interval_s: float = option(1.0, check=POSITIVE)
    #: How often the broker logs its counters.
    stats_interval_s: float = option(10.0, check=POSITIVE)
    #: CURVE keys (``pervade keys init``): the broker's key pair and ``authorized/`` client keys. None: plain
    #: TCP, allowed on a loopback address only, unless ``insecure``.
    keys_dir: Path | None = None
    #: Listen on a network address without keys (anyone who can reach it may submit, pull and read).
    insecure: bool = option(
        False,
        "listen on a network address without keys: anyone who reaches it can submit, take work and read verdicts",
        flag="--insecure",
        group=SECURITY_SECTION,
    )
    #: Seconds the run must have been over (every job complete, no producer preparing one) before workers
    #: are told ``drained``; checked on each heartbeat.
    drain_grace_s: float = option(
        10.0, "tell workers the run is over (batch jobs then end) once every job has been complete for this long "
        "and no producer is preparing one", flag="--drain-grace", metavar="SECONDS", check=NON_NEGATIVE,
    )  # fmt: skip
    #: Serve Prometheus metrics over HTTP on this port (0: a free one; None: no metrics). Plain HTTP: the
    #: metrics hold counts, worker names and model names, never claims or verdicts (docs/monitoring.md).
    metrics_port: int | None = option(
        None, "serve Prometheus metrics at http://HOST:PORT/metrics; 0 picks a free port, logged as "
        "metrics_listening (default: none)", flag="--metrics-port", metavar="PORT", check=between(0, 65535),
    )  # fmt: skip
    #: Interface the metrics server listens on; loopback unless a scraper on another host needs it.
    metrics_host: str = option(
        "127.0.0.1",
        "interface the metrics server listens on; 0.0.0.0 for a scraper on another host",
        flag="--metrics-host",
        metavar="HOST",
    )

    def __post_init__(self) -> None:
        check_options(self)
        if self.keys_dir is None and not self.insecure and not is_loopback(self.bind):
            raise ConfigError(
                f"refusing to listen on {self.bind} without keys: anyone who can reach it could submit claims, "
                "take work and read verdicts. Create keys with `pervade keys init DIR` and pass --keys DIR "
                "(or set PERVADE_KEYS), or pass --insecure on a network you trust"
            )
