"""Workers with keys of their own fetch model files from each other: the broker names each source's public key
(``Sources.peer_keys``), a downloader uses it as the peer's server key, and a peer's file service admits
worker keys only. The broker side without sockets; the file service and downloader over real sockets."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import replace
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from pervade.broker.sources import FileSources
from pervade.context import ContextSpec
from pervade.gpuworker.cache import FileCache
from pervade.gpuworker.fetch import Fetcher, TransferConfig
from pervade.gpuworker.fileserver import FileServer, FileServiceConfig
from pervade.keyadmin import add_key
from pervade.keyring import KeyHolder, Role
from pervade.keys import ClientKeys, PeerAdmission, init_keys
from pervade.manifest import build_manifest
from pervade.protocol import FetchChunk, FilesHeld, FindSources, Message, Sources, WorkerReady, encode
from tests.test_broker_verbs import CPU, Broker
from tests.test_files import PIECE, Probe, fill, write_model_dir

DIGEST = "a" * 64


def public_key() -> str:
    return zmq.curve_keypair()[0].decode("ascii")


# --- the broker names each source's key ---------------------------------------------------------


def test_sources_carry_each_holders_key_and_forget_it_with_the_holder() -> None:
    k0, k1 = public_key(), public_key()
    files = FileSources(max_sources=4)
    files.held(b"w0", "tcp://w0", [DIGEST], key=k0)
    files.held(b"w1", "tcp://w1", [DIGEST], key=k1)
    assert files.find(b"w2", DIGEST, []) == Sources(files=DIGEST, peers=["tcp://w0", "tcp://w1"], peer_keys=[k0, k1])
    files.forget(b"w0")
    assert b"w0" not in files.keys
    assert files.find(b"w3", DIGEST, []) == Sources(files=DIGEST, peers=["tcp://w1"], peer_keys=[k1])
    # a source whose key is unknown: no keys at all rather than a list that does not match ``peers``
    files.held(b"w4", "tcp://w4", [DIGEST])
    assert files.find(b"w5", DIGEST, ["tcp://w1"]) == Sources(files=DIGEST, peers=["tcp://w4"])


def send_as(broker: Broker, identity: bytes, sender: KeyHolder | None, message: Message) -> list[Message]:
    """``identity`` sends ``message`` over a connection authenticated as ``sender``; what it is sent back."""
    broker.parts.router.handle([identity, *encode(message)], sender=sender)
    return broker.to(identity)


def ready(name: str, files: tuple[str, ...] = ()) -> WorkerReady:
    return WorkerReady(worker_id=name, host="h", pid=1, device=CPU, file_endpoint=f"tcp://{name}:1", files=list(files))


def test_the_broker_names_the_key_each_source_registered_with(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    node = {name: KeyHolder(Role.WORKER, name, public_key()) for name in ("node1", "node2", "node3")}
    send_as(broker, b"w1", node["node1"], ready("w1", (DIGEST,)))  # holds the files when it registers
    send_as(broker, b"w2", node["node2"], ready("w2"))
    assert broker.state.workers[b"w1"].key == node["node1"]
    answer = send_as(broker, b"w2", node["node2"], FindSources(files=DIGEST))
    assert answer == [Sources(files=DIGEST, peers=["tcp://w1:1"], peer_keys=[node["node1"].public])]
    send_as(broker, b"w2", node["node2"], FilesHeld(files=DIGEST, peer_bytes=1))  # a finished download
    send_as(broker, b"w3", node["node3"], ready("w3"))
    [sources] = send_as(broker, b"w3", node["node3"], FindSources(files=DIGEST))
    assert isinstance(sources, Sources)
    assert dict(zip(sources.peers, sources.peer_keys, strict=True)) == {
        "tcp://w1:1": node["node1"].public,
        "tcp://w2:1": node["node2"].public,
    }


def test_a_broker_without_keys_names_no_keys(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    send_as(broker, b"w1", None, ready("w1", (DIGEST,)))
    send_as(broker, b"w2", None, ready("w2"))
    assert send_as(broker, b"w2", None, FindSources(files=DIGEST)) == [Sources(files=DIGEST, peers=["tcp://w1:1"])]


# --- the file service and the downloader, over real sockets -------------------------------------


def node_keys(directory: Path, run_keys: Path) -> ClientKeys:
    """A worker node's own keys directory: a worker key pair of its own, and the run's broker key."""
    directory.mkdir(mode=0o700)
    _, secret = zmq.auth.create_certificates(str(directory), "worker")
    Path(secret).chmod(0o600)
    shutil.copyfile(run_keys / "broker.key", directory / "broker.key")
    return ClientKeys.load(directory, "worker")


async def test_workers_with_keys_of_their_own_fetch_from_each_other(tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path / "model", {"config.json": 300, "model.safetensors": 3 * PIECE + 5})
    manifest = build_manifest(model_dir, piece_size=PIECE)
    keys = tmp_path / "keys"
    init_keys(keys)
    serving = ClientKeys.load(keys, "worker")  # worker A, whose keys directory has authorized/
    fetching = node_keys(tmp_path / "node2", keys)  # worker B, on another node
    shutil.copyfile(tmp_path / "node2" / "worker.key", keys / "authorized" / "worker" / "node2.key")
    producer = ClientKeys.load(keys, "producer")  # admitted by the broker (authorized/producer/), not by peers
    ctx = zmq.asyncio.Context()
    auth = AsyncioAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=PeerAdmission(serving))
    cache = FileCache(tmp_path / "cache-a")
    fill(cache, model_dir, manifest)
    server = FileServer(ctx, cache, FileServiceConfig(bind_host="127.0.0.1"), "127.0.0.1", keys=serving)
    server.start()
    stop = asyncio.Event()
    task = asyncio.create_task(server.serve(stop))
    answers = [
        Sources(files=manifest.digest, peers=[server.endpoint]),  # no key named: B tries its own, refused
        Sources(files=manifest.digest, peers=[server.endpoint], peer_keys=[serving.public.decode()]),
    ]
    asked: list[list[str]] = []

    async def find_sources(digest: str, exclude: list[str]) -> Sources:
        asked.append(exclude)
        return answers[min(len(asked), len(answers)) - 1]

    request = FetchChunk(files=manifest.digest, path="config.json", offset=0, length=10)
    as_producer = Probe(server.endpoint, b"producer", ClientKeys(producer.public, producer.secret, serving.public))
    revoked: Probe | None = None
    fetch_ctx = zmq.asyncio.Context()
    try:
        config = TransferConfig(chunk_bytes=16 * 1024, peer_timeout_s=1.0)
        fetcher = Fetcher(fetch_ctx, FileCache(tmp_path / "cache-b"), config, find_sources, fetching.for_peers())
        spec = ContextSpec(model=str(tmp_path / "nowhere"), files=manifest.digest)
        view, stats = await fetcher.fetch(spec, manifest)
        assert stats.peer_bytes == manifest.total_bytes and stats.origin_bytes == 0
        assert stats.peers_failed == 1, "B reached A under its own public key as the server key"
        assert (view / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
        assert not await as_producer.answered(request), "a producer key downloaded from a worker's file service"
        (keys / "authorized" / "worker" / "node2.key").unlink()  # B's key revoked: its next connection is refused
        revoked = Probe(server.endpoint, b"revoked", replace(fetching, server_public=serving.public))
        assert not await revoked.answered(request), "a revoked worker key downloaded from a worker's file service"
    finally:
        as_producer.close()
        if revoked is not None:
            revoked.close()
        stop.set()
        await task
        auth.stop()
        fetch_ctx.term()
        ctx.term()


async def test_once_the_broker_vouches_a_file_service_admits_only_its_word(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    init_keys(keys)
    revoked = add_key(keys, "worker", "revoked-at-the-broker").holder.public.encode()
    admission = PeerAdmission(ClientKeys.load(keys, "worker"))  # this node's copy of authorized/ lists it
    producer = ClientKeys.load(keys, "producer").public
    assert await admission.callback("*", revoked) and not await admission.callback("*", producer)
    node2 = add_key(keys, "worker", "node2").holder.public
    admission.vouch([node2])  # the broker's PeerKeys: the key above is not among them any more
    assert not await admission.callback("*", revoked) and await admission.callback("*", node2.encode())
    assert await admission.callback("*", admission.own)  # its own key, always
