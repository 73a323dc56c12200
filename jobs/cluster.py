"""A cluster of pervade processes on this machine that can be broken on purpose: start every component as its
own process, kill any of them with any signal, start it again, and watch progress from the outside.

The chaos test (tests/test_chaos.py) and the chaos benchmark (bench/chaos.py) drive runs through this.
Every process is started exactly as on a cluster (``python -m pervade ROLE ...``), with the same heartbeat
settings, and logs JSON lines to ``log_dir/NAME.log`` (a restarted process appends to the same log).

With a ``ClusterLab`` (``jobs/lab/cluster.py``) the same processes run on the lab's hosts instead of on
loopback: the broker, sinks and producers on its login host, bound to and reaching its address; each worker
on a compute host (round robin, or the one named), serving its files on that host's address. The broker then
listens on a network address, so the cluster is keyed (``keys``): every process gets ``--keys``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from pervade.jobs.lab.cluster import ClusterLab, Host
from pervade.jobs.local import ProcessGroup, read_events, wait_for_endpoint


@dataclass
class LocalCluster:
    """A broker with durable state, sinks, workers and producers, as processes under ``base``."""

    base: Path
    #: Heartbeat interval and liveness passed to every process.
    heartbeat_interval_s: float = 0.5
    heartbeat_liveness: int = 3
    log_level: str = "info"
    endpoint: str = ""
    #: The hosts to run on (None: this machine, over loopback).
    lab: ClusterLab | None = None
    #: A keys directory (``pervade keys init``) passed to every process; a lab's cluster needs one.
    keys: Path | None = None
    procs: ProcessGroup = field(init=False)
    #: The lab host of each worker started.
    worker_hosts: dict[str, Host] = field(default_factory=dict)
    _workers_started: int = 0
    _row_counts: dict[Path, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        (self.base / "logs").mkdir(parents=True, exist_ok=True)
        self.procs = ProcessGroup(self.base / "logs", self.log_level)
        if self.lab is not None and self.keys is None:
            raise ValueError("a cluster on a lab's hosts listens on a network address: give it keys")

    @property
    def out_dir(self) -> Path:
        return self.base / "out"

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    def _heartbeats(self) -> tuple[str, ...]:
        keys = ("--keys", str(self.keys)) if self.keys is not None else ()
        return (
            "--heartbeat-interval",
            str(self.heartbeat_interval_s),
            "--heartbeat-liveness",
            str(self.heartbeat_liveness),
            *keys,
        )

    def _on_login(self) -> tuple[str, ...]:
        """The prefix that runs a process on the login host (none without a lab)."""
        return tuple(self.lab.login.command()) if self.lab is not None else ()

    async def start_broker(self, *extra: str) -> None:
        """Start (or restart) the broker on its state directory. A restart binds the endpoint of the
        first start, so every client finds it again."""
        endpoint_file = self.base / "endpoint"
        endpoint_file.unlink(missing_ok=True)
        host = self.lab.login.address if self.lab is not None else "127.0.0.1"
        bind = self.endpoint or f"tcp://{host}:*"
        process = await self.procs.start("broker", "broker", "--bind", bind, "--state", str(self.state_dir),
                                         "--endpoint-file", str(endpoint_file), *self._heartbeats(), *extra,
                                         prefix=self._on_login())  # fmt: skip
        self.endpoint = await wait_for_endpoint(endpoint_file, process)

    async def start_sink(self, *extra: str, name: str = "sink") -> None:
        await self.procs.start(name, "sink", "--broker", self.endpoint, "--out", str(self.out_dir), "--sink-id", name,
                               *self._heartbeats(), *extra, prefix=self._on_login())  # fmt: skip

    async def start_worker(self, *extra: str, host: str | None = None) -> str:
        """Start one more worker (names count up: worker-0, worker-1, ...); returns its name. Each worker
        has a node cache of its own (as if on its own node) and serves it on loopback, or on a lab's compute
        host (``host``, else the next in turn) at that host's address."""
        name = f"worker-{self._workers_started}"
        self._workers_started += 1
        address, prefix = "127.0.0.1", ()
        if self.lab is not None:
            placed = (
                self.lab.hosts[host] if host else self.lab.compute[(self._workers_started - 1) % len(self.lab.compute)]
            )
            self.worker_hosts[name] = placed
            address, prefix = placed.address, tuple(placed.command())
        files = ("--cache-dir", str(self.cache_dir(name)), "--file-host", address, "--file-bind-host", address)
        await self.procs.start(name, "worker", "--broker", self.endpoint, "--worker-id", name, *files, *self._heartbeats(),
                               *extra, prefix=prefix)  # fmt: skip
        return name

    def cache_dir(self, worker: str) -> Path:
        return self.base / "caches" / worker

    async def start_producer(self, *args: str, name: str = "producer") -> None:
        await self.procs.start(
            name, "produce", "--broker", self.endpoint, *self._heartbeats(), *args, prefix=self._on_login()
        )

    def running(self, name: str) -> bool:
        return name in self.procs.children and self.procs.children[name].returncode is None

    def serving_workers(self) -> list[str]:
        """Workers running and connected (not still importing torch)."""
        return [
            name for name in self.procs.children
            if name.startswith("worker-") and self.running(name) and self.events(name, "worker_started")
        ]  # fmt: skip

    def events(self, name: str, event: str) -> list[dict]:
        """The log records of one process with this event name."""
        return read_events(self.procs.log_dir / f"{name}.log", event)

    def broker_counters(self) -> dict:
        """The last counters the broker logged (they persist in its state across restarts)."""
        stats = self.events("broker", "broker_stats")
        return stats[-1] if stats else {}

    def rows_written(self) -> int:
        """Rows in final Parquet files so far (each file's footer is read once)."""
        for path in self.out_dir.glob("*.parquet"):
            if path not in self._row_counts:
                self._row_counts[path] = pq.read_metadata(path).num_rows
        return sum(self._row_counts.values())

    async def stop(self) -> None:
        """SIGTERM everything still running (SIGKILL after a timeout)."""
        await self.procs.stop(list(self.procs.children))
