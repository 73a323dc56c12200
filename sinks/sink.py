"""The sink: receives results from the broker, writes them to Parquet, acknowledges what is durable.

A batch is acknowledged only after the file holding its rows has its final name, so the broker knows
exactly which results could still be lost. Files roll when they reach ``file_rows`` rows, when the oldest
unacknowledged result is ``roll_seconds`` old, when no result has come for ``idle_roll_seconds``, and on
shutdown.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import structlog
import zmq.asyncio

from pervade.constants import DEFAULT_BROKER_CONNECT
from pervade.errors import ConfigError
from pervade.protocol import Deliver, Disconnect, Error, SinkAck, SinkReady
from pervade.transport import BrokerConnection
from sinks.parquet import RollingParquetWriter

log = structlog.get_logger("sinks")


@dataclass(frozen=True)
class SinkConfig:
    """How a sink writes."""

    #: Directory for the Parquet files (created if missing).
    out_dir: Path
    broker: str = DEFAULT_BROKER_CONNECT
    #: Rows per Parquet row group; a full group is written out at once.
    row_group_rows: int = 10_000
    #: Rows per file; a full file is closed, renamed and acknowledged.
    file_rows: int = 1_000_000
    #: Longest a received result waits before its file is closed and it is acknowledged.
    roll_seconds: float = 2.0
    #: Close the file early once no result has arrived for this long (the end of a job, a lull).
    idle_roll_seconds: float = 0.5
    #: A name for the files and logs; defaults to a fresh random id.
    sink_id: str | None = None

    def __post_init__(self) -> None:
        if self.row_group_rows < 1 or self.file_rows < 1:
            raise ConfigError("row_group_rows and file_rows must be at least 1")
        if self.roll_seconds <= 0 or self.idle_roll_seconds <= 0:
            raise ConfigError("roll_seconds and idle_roll_seconds must be positive")


class Sink:
    def __init__(self, config: SinkConfig, ctx: zmq.asyncio.Context | None = None) -> None:
        self.config = config
        self.sink_id = config.sink_id or f"sink-{uuid.uuid4().hex[:8]}"
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self.writer = RollingParquetWriter(config.out_dir, f"verdicts-{stamp}-{self.sink_id}", config.row_group_rows)
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._stopping = asyncio.Event()
        self._oldest_unacked: float | None = None
        self._last_delivery = 0.0
        self.rows_written = 0

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(sink_id=self.sink_id)
        conn = BrokerConnection.open(self._ctx, self.config.broker, "sink")
        try:
            await conn.send(SinkReady(sink_id=self.sink_id))
            log.info("sink_started", broker=self.config.broker, out_dir=str(self.config.out_dir))
            while not self._stopping.is_set():
                message = await conn.receive(timeout_s=0.1)
                if isinstance(message, Deliver):
                    await self.accept(conn, message)
                elif isinstance(message, Error):
                    log.error("broker_error", reason=message.reason, detail=message.detail)
                elif message is not None:
                    log.warning("unexpected_message", kind=type(message).__name__)
                if self.roll_due(time.monotonic()):
                    await self.roll(conn)
            await self.roll(conn, final=True)
            await conn.send(Disconnect(reason="stopping"))
        finally:
            conn.close()
            log.info("sink_stopped", rows_written=self.rows_written, files=len(self.writer.files_written))

    def roll_due(self, now: float) -> bool:
        if self._oldest_unacked is None:
            return False
        return (
            now - self._oldest_unacked >= self.config.roll_seconds
            or now - self._last_delivery >= self.config.idle_roll_seconds
        )

    async def accept(self, conn: BrokerConnection, message: Deliver) -> None:
        self.writer.add(message.result)
        self._last_delivery = time.monotonic()
        if self._oldest_unacked is None:
            self._oldest_unacked = self._last_delivery
        if self.writer.rows_in_file >= self.config.file_rows:
            await self.roll(conn)
        elif self.writer.buffered_rows >= self.config.row_group_rows:
            await asyncio.to_thread(self.writer.flush)

    async def roll(self, conn: BrokerConnection, final: bool = False) -> None:
        rows = self.writer.rows_in_file
        durable = await asyncio.to_thread(self.writer.close if final else self.writer.roll)
        self._oldest_unacked = None
        if durable:
            self.rows_written += rows
            await conn.send(SinkAck(batch_ids=durable))
            log.info("file_written", batches=len(durable), rows=rows, path=str(self.writer.files_written[-1]))


async def run_sink(config: SinkConfig) -> None:
    """Run a sink until SIGTERM or SIGINT; the open file is finished and acknowledged before exit."""
    sink = Sink(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sink.stop)
    await sink.run()
