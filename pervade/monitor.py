"""``pervade status``: ask the broker for a snapshot of the run and show it, refreshed in place like
``top``, or once as JSON for scripts. The broker builds the snapshot (broker/status.py); this module only
fetches and draws it."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import TextIO

import msgspec
import zmq.asyncio
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pervade.errors import BrokerUnreachable
from pervade.keys import ClientKeys
from pervade.options import POSITIVE, check_options, option
from pervade.protocol import StatusReply, StatusRequest, StatusSnapshot
from pervade.transport import BrokerConnection

#: Seconds to wait for the broker's answer before calling it unreachable.
DEFAULT_STATUS_TIMEOUT_S = 5.0


class StatusClient:
    """One connection to the broker, asked for a snapshot as often as needed. A request left unanswered
    closes the connection (a late answer must not be taken for the next one's)."""

    def __init__(self, endpoint: str, keys: ClientKeys | None = None, ctx: zmq.asyncio.Context | None = None) -> None:
        self.endpoint = endpoint
        self.keys = keys
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._connection: BrokerConnection | None = None

    async def snapshot(self, timeout_s: float = DEFAULT_STATUS_TIMEOUT_S) -> StatusSnapshot:
        if self._connection is None:
            self._connection = BrokerConnection.open(self._ctx, self.endpoint, "monitor", self.keys)
        connection = self._connection
        deadline = time.monotonic() + timeout_s
        try:
            await asyncio.wait_for(connection.send(StatusRequest()), timeout_s)
            while (left := deadline - time.monotonic()) > 0:
                message = await connection.receive(timeout_s=left)
                if isinstance(message, StatusReply):
                    return message.snapshot
        except (TimeoutError, zmq.ZMQError):
            pass
        self.close()
        raise BrokerUnreachable(
            f"no answer from the broker at {self.endpoint} within {timeout_s:g} s "
            "(is it running? with --keys, are this client's keys authorised?)"
        )

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


async def fetch_status(
    endpoint: str, keys: ClientKeys | None = None, timeout_s: float = DEFAULT_STATUS_TIMEOUT_S
) -> StatusSnapshot:
    """One snapshot of the run (what ``pervade status --json`` prints). Raises BrokerUnreachable."""
    client = StatusClient(endpoint, keys)
    try:
        return await client.snapshot(timeout_s)
    finally:
        client.close()


def snapshot_json(snapshot: StatusSnapshot) -> str:
    return json.dumps(msgspec.to_builtins(snapshot), indent=2)


# --- drawing -------------------------------------------------------------------------------------


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{count} B"


_STATE_STYLE = {"busy": "green", "idle": "yellow", "loading": "cyan", "leaving": "magenta"}


def summary_line(snapshot: StatusSnapshot) -> Text:
    s, c = snapshot, snapshot.counters
    percent = 100 * s.pairs_done / s.pairs_total if s.pairs_total else 0.0
    states: dict[str, int] = {}
    for worker in s.workers:
        states[worker.state] = states.get(worker.state, 0) + 1
    workers = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "none"
    return Text.assemble(
        ("pervade ", "bold"), f"broker {s.endpoint}, up {format_duration(s.uptime_s)}\n",
        ("done ", "bold"), f"{s.pairs_done:,} of {s.pairs_total:,} pairs ({percent:.1f}%)   ",
        ("rate ", "bold"), f"{s.claims_per_s:,.1f} claims/s   ",
        ("ETA ", "bold"), f"{format_duration(s.eta_s)}\n",
        ("workers ", "bold"), f"{len(s.workers)} ({workers})   ", ("sinks ", "bold"), f"{s.sinks}   ",
        ("producers ", "bold"), f"{s.producers}\n",
        ("requeues ", "bold"), f"{c.get('requeues', 0):,}   ", ("failed batches ", "bold"),
        f"{c.get('batches_failed', 0):,}   ", ("context loads ", "bold"), f"{c.get('context_loads', 0):,}   ",
        ("model files ", "bold"), f"{format_bytes(c.get('peer_bytes', 0))} from peers, "
        f"{format_bytes(c.get('origin_bytes', 0))} from the origin",
    )  # fmt: skip


def workers_table(snapshot: StatusSnapshot) -> Table:
    table = Table(title="workers", title_justify="left", expand=True)
    for name, justify in [("worker", "left"), ("key", "left"), ("host", "left"), ("device", "left"),
                          ("context", "left"), ("state", "left"), ("batches", "right"), ("claims", "right"),
                          ("claims/s", "right"), ("held", "right"), ("heard", "right")]:  # fmt: skip
        table.add_column(name, justify=justify, overflow="fold")
    for w in snapshot.workers:
        table.add_row(
            w.worker_id, w.key or "–", w.host, w.device, ", ".join(w.contexts) or "–",
            Text(w.state, style=_STATE_STYLE.get(w.state, "")), f"{w.batches_done:,}", f"{w.claims_done:,}",
            f"{w.claims_per_s:,.1f}", str(w.in_flight), f"{w.last_seen_s:.1f}s ago",
        )  # fmt: skip
    return table


def contexts_table(snapshot: StatusSnapshot) -> Table:
    table = Table(title="queues", title_justify="left", expand=True)
    for name, justify in [("context", "left"), ("model", "left"), ("dtype", "left"), ("queued batches", "right"),
                          ("workers", "right"), ("loaded", "right")]:  # fmt: skip
        table.add_column(name, justify=justify, overflow="fold")
    for ctx in snapshot.contexts:
        table.add_row(
            ctx.context_id, ctx.model, ctx.dtype, f"{ctx.queued_batches:,}", str(ctx.workers), str(ctx.loaded_workers)
        )
    return table


def jobs_table(snapshot: StatusSnapshot) -> Table:
    table = Table(title="jobs", title_justify="left", expand=True)
    for name, justify in [
        ("job", "left"),
        ("pairs", "right"),
        ("done", "right"),
        ("failed", "right"),
        ("state", "left"),
    ]:
        table.add_column(name, justify=justify)
    for job in snapshot.jobs:
        state = "done" if job.done else ("submitted" if job.ended else "submitting")
        table.add_row(job.job_id, f"{job.pairs:,}", f"{job.pairs_done:,}", f"{job.pairs_failed:,}", state)
    return table


def render(snapshot: StatusSnapshot, problem: str | None = None) -> Group:
    parts: list = [summary_line(snapshot), workers_table(snapshot), contexts_table(snapshot), jobs_table(snapshot)]
    if problem:
        parts.insert(0, Text(problem, style="bold red"))
    return Group(*parts)


@dataclass(frozen=True)
class WatchOptions:
    """How ``pervade status`` shows the run."""

    interval_s: float = option(2.0, "seconds between refreshes", flag="--interval", metavar="SECONDS", check=POSITIVE)
    timeout_s: float = option(DEFAULT_STATUS_TIMEOUT_S, "give up on a broker silent for this long",
                              flag="--timeout", metavar="SECONDS", check=POSITIVE)  # fmt: skip
    once: bool = option(False, "print one snapshot and exit, even on a terminal", flag="--once")

    def __post_init__(self) -> None:
        check_options(self)


async def show_status(
    endpoint: str, keys: ClientKeys | None, options: WatchOptions, out: TextIO, as_json: bool = False
) -> None:
    """Print one snapshot (JSON, or a text view when ``out`` is not a terminal or ``once``), or keep a live
    view refreshing in place until interrupted. A broker that stops answering mid-watch is shown, not fatal."""
    client = StatusClient(endpoint, keys)
    try:
        snapshot = await client.snapshot(options.timeout_s)
        if as_json:
            print(snapshot_json(snapshot), file=out)
            return
        console = Console(file=out)
        if not console.is_terminal:
            console = Console(file=out, width=160)  # a file or a pipe: no terminal width to fit
        if options.once or not console.is_terminal:
            console.print(render(snapshot))
            return
        with Live(render(snapshot), console=console, screen=True, auto_refresh=False) as live:
            while True:
                await asyncio.sleep(options.interval_s)
                try:
                    snapshot = await client.snapshot(options.timeout_s)
                    live.update(render(snapshot), refresh=True)
                except BrokerUnreachable as exc:
                    live.update(render(snapshot, problem=f"{exc}; showing the last snapshot"), refresh=True)
    finally:
        client.close()
