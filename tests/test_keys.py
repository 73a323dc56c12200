"""CURVE keys: ``pervade keys init``, loading, and the broker-side admission of client keys over real sockets."""

from __future__ import annotations

import asyncio
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from pervade.errors import ConfigError
from pervade.keys import AuthorizedKeys, ClientKeys, ServerKeys, init_keys, keys_dir


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_a_key_pair_per_role_and_authorises_the_roles(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    done = subprocess.run([sys.executable, "-m", "pervade", "keys", "init", str(keys)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    roles = ("worker", "producer", "sink", "monitor")
    assert sorted(p.relative_to(keys).as_posix() for p in keys.rglob("*")) == sorted(
        ["authorized", "broker.key", "broker.key_secret"]
        + [f"{role}{suffix}" for role in roles for suffix in (".key", ".key_secret")]
        + [f"authorized/{role}.key" for role in roles]
    )
    assert {mode(keys / f"{name}.key_secret") for name in ("broker", *roles)} == {0o600}
    assert mode(keys) == 0o700
    clients, server = [ClientKeys.load(keys, role) for role in roles], ServerKeys.load(keys)
    assert all(c.server_public == server.public for c in clients)
    assert len({server.public, *(c.public for c in clients)}) == 5  # five different key pairs
    assert AuthorizedKeys(server.authorized).admitted() == {c.public for c in clients}


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    init_keys(tmp_path)
    old = ClientKeys.load(tmp_path, "producer")
    done = subprocess.run([sys.executable, "-m", "pervade", "keys", "init", str(tmp_path)], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "already holds keys" in done.stderr and "--force" in done.stderr
    assert ClientKeys.load(tmp_path, "producer") == old
    init_keys(tmp_path, force=True)
    new = ClientKeys.load(tmp_path, "producer")
    assert new.public != old.public
    admitted = AuthorizedKeys(tmp_path / "authorized").admitted()
    assert new.public in admitted and old.public not in admitted  # the old keys are revoked


def test_a_secret_readable_by_others_is_refused(tmp_path: Path) -> None:
    init_keys(tmp_path)
    (tmp_path / "sink.key_secret").chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others: chmod 600"):
        ClientKeys.load(tmp_path, "sink")


def test_missing_and_foreign_key_files_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no key file .*worker.key_secret .*pervade keys init"):
        ClientKeys.load(tmp_path, "worker")
    init_keys(tmp_path)
    with pytest.raises(ConfigError, match="unknown client role 'broker'"):
        ClientKeys.load(tmp_path, "broker")
    (tmp_path / "broker.key").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="is not a ZeroMQ certificate"):
        ClientKeys.load(tmp_path, "worker")
    shutil.rmtree(tmp_path / "authorized")
    with pytest.raises(ConfigError, match="no directory of authorised client keys"):
        ServerKeys.load(tmp_path)


def test_the_keys_directory_comes_from_the_flag_else_the_environment(tmp_path: Path) -> None:
    assert keys_dir(tmp_path / "a", {"PERVADE_KEYS": str(tmp_path / "b")}) == tmp_path / "a"
    assert keys_dir(None, {"PERVADE_KEYS": str(tmp_path / "b")}) == tmp_path / "b"
    assert keys_dir(None, {}) is None


async def test_only_authorised_clients_are_served_and_revocation_needs_no_restart(tmp_path: Path) -> None:
    init_keys(tmp_path / "run")
    server_keys = ServerKeys.load(tmp_path / "run")
    good = ClientKeys.load(tmp_path / "run", "producer")
    stranger_public, stranger_secret = zmq.auth.create_certificates(str(tmp_path), "stranger")
    stranger = ClientKeys(*zmq.auth.load_certificate(stranger_secret), server_public=server_keys.public)  # type: ignore[arg-type]

    ctx = zmq.asyncio.Context()
    auth = AsyncioAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=AuthorizedKeys(server_keys.authorized, refresh_s=0.0))
    server = ctx.socket(zmq.ROUTER)
    server_keys.apply(server)
    port = server.bind_to_random_port("tcp://127.0.0.1")

    async def echo() -> None:
        while True:
            identity, body = await server.recv_multipart()
            await server.send_multipart([identity, b"echo:" + body])

    async def served(keys: ClientKeys | None) -> bool:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        if keys is not None:
            keys.apply(sock)
        sock.connect(f"tcp://127.0.0.1:{port}")
        try:
            await sock.send(b"hello")
            return bool(await sock.poll(1500)) and await sock.recv() == b"echo:hello"
        finally:
            sock.close()

    echoing = asyncio.create_task(echo())
    try:
        assert await served(good)
        assert not await served(stranger), "a key not in authorized/ was served"
        assert not await served(None), "a plain (no CURVE) client was served"
        wrong_server = ClientKeys(good.public, good.secret, server_public=stranger.public)
        assert not await served(wrong_server), "a client trusting another server key got through"

        shutil.copyfile(stranger_public, server_keys.authorized / "stranger.key")  # granted, live
        assert await served(stranger)
        (server_keys.authorized / "producer.key").unlink()  # revoked, live
        assert not await served(good)
    finally:
        echoing.cancel()
        auth.stop()
        server.close(linger=0)
        ctx.term()
