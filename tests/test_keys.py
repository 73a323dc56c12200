"""CURVE keys: ``pervade keys init | add | list | revoke``, loading, each key's role, and the broker-side admission
of client keys over real sockets."""

from __future__ import annotations

import argparse
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

from pervade.commands import monitor_keys
from pervade.errors import ConfigError
from pervade.keyadmin import add_key, list_keys, revoke_key
from pervade.keyring import KeyHolder, KeyRing, Role, read_authorized
from pervade.keys import ClientKeys, ServerKeys, init_keys, keys_dir

ROLES = ("worker", "producer", "sink", "monitor")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def pervade_keys(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pervade", "keys", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def public_of(path: Path) -> str:
    return zmq.auth.load_certificate(path)[0].decode("ascii")


def admitted(keys: Path) -> dict[str, str]:
    """Who is admitted, as {"role/name": public key}."""
    return {str(holder): public for public, holder in read_authorized(keys / "authorized").holders.items()}


def make_legacy(keys: Path) -> None:
    """A keys directory as `pervade keys init` made it before roles were enforced: flat authorized/ROLE.key."""
    init_keys(keys)
    for role in ROLES:
        (keys / "authorized" / role / f"{role}.key").rename(keys / "authorized" / f"{role}.key")
        (keys / "authorized" / role).rmdir()


def test_init_writes_a_key_pair_per_role_and_admits_each_as_its_role(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    done = pervade_keys("init", keys)
    assert done.returncode == 0, done.stderr
    assert sorted(p.relative_to(keys).as_posix() for p in keys.rglob("*")) == sorted(
        ["authorized", "broker.key", "broker.key_secret"]
        + [f"{role}{suffix}" for role in ROLES for suffix in (".key", ".key_secret")]
        + [f"authorized/{role}" for role in ROLES]
        + [f"authorized/{role}/{role}.key" for role in ROLES]
    )
    assert {mode(keys / f"{name}.key_secret") for name in ("broker", *ROLES)} == {0o600}
    assert mode(keys) == 0o700
    clients, server = [ClientKeys.load(keys, role) for role in ROLES], ServerKeys.load(keys)
    assert all(c.server_public == server.public for c in clients)
    assert len({server.public, *(c.public for c in clients)}) == 5  # five different key pairs
    listing = read_authorized(server.authorized)
    assert listing.problems == ()
    assert listing.holders == {
        c.public.decode(): KeyHolder(Role(role), role, c.public.decode())
        for role, c in zip(ROLES, clients, strict=True)
    }


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    init_keys(tmp_path)
    old = ClientKeys.load(tmp_path, "producer")
    done = pervade_keys("init", tmp_path)
    assert done.returncode == 2 and "already holds keys" in done.stderr and "--force" in done.stderr
    assert ClientKeys.load(tmp_path, "producer") == old
    add_key(tmp_path, "worker", "alice")
    init_keys(tmp_path, force=True)
    new = ClientKeys.load(tmp_path, "producer")
    assert new.public != old.public
    assert admitted(tmp_path) == {f"{role}/{role}": public_of(tmp_path / f"{role}.key") for role in ROLES}
    # the old keys, and keys added since, are revoked


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


def test_add_writes_the_directory_a_client_runs_with_and_admits_its_key_as_the_role(tmp_path: Path) -> None:
    init_keys(tmp_path)
    ring = KeyRing(tmp_path / "authorized")
    ring.refresh()
    added = add_key(tmp_path, "worker", "alice")

    bundle = tmp_path / "clients" / "worker" / "alice"
    assert added.bundle == bundle and added.file == tmp_path / "authorized" / "worker" / "alice.key"
    assert sorted(p.name for p in bundle.iterdir()) == ["broker.key", "worker.key", "worker.key_secret"]
    assert mode(bundle) == mode(bundle.parent) == mode(tmp_path / "clients") == 0o700
    assert mode(bundle / "worker.key_secret") == 0o600
    client = ClientKeys.load(bundle, "worker")  # what `pervade worker --keys DIR/clients/worker/alice` loads
    assert client.server_public == ServerKeys.load(tmp_path).public
    assert client.public not in {ClientKeys.load(tmp_path, role).public for role in ROLES}  # a pair of its own
    public = client.public.decode()
    assert added.holder == KeyHolder(Role.WORKER, "alice", public)
    assert ring.refresh().holders[public] == added.holder  # a running broker's ring sees it at once
    assert ring.listing.problems == ()
    assert [p.name for p in (tmp_path / "authorized" / "worker").iterdir() if p.name.startswith(".")] == []


def test_add_public_admits_a_key_made_elsewhere_and_writes_no_secret(tmp_path: Path) -> None:
    init_keys(tmp_path / "run")
    public_file, secret_file = zmq.auth.create_certificates(str(tmp_path), "laptop")
    added = add_key(tmp_path / "run", "producer", "carol", public_file=Path(public_file))
    assert added.bundle is None and not (tmp_path / "run" / "clients").exists()
    assert admitted(tmp_path / "run")["producer/carol"] == public_of(Path(public_file))

    # handed the secret file by mistake: only its public half is admitted, the secret goes nowhere
    _, other_secret = zmq.auth.create_certificates(str(tmp_path), "other")
    added = add_key(tmp_path / "run", "monitor", "dave", public_file=Path(other_secret))
    assert zmq.auth.load_certificate(added.file) == (public_of(Path(other_secret)).encode(), None)
    assert "secret-key" not in added.file.read_text()


def test_add_refuses_what_would_make_a_role_or_name_ambiguous_or_cannot_work(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    init_keys(keys)
    before = admitted(keys)
    (tmp_path / "junk.key").write_text("not a certificate\n")
    (tmp_path / "short.key").write_text('curve\n    public-key = "abc"\n')
    refusals = [
        (("wizard", "x"), {}, "unknown role 'wizard'; one of worker, producer, sink, monitor"),
        (("broker", "x"), {}, "unknown role 'broker'"),
        (("worker", "../x"), {}, "bad key name '../x'"),
        (("worker", "-x"), {}, "bad key name"),
        (("worker", "alice\n"), {}, "bad key name"),
        (("worker", "a" * 65), {}, "bad key name"),
        (("worker", "worker"), {}, r"worker/worker is already a key \(.*authorized/worker/worker.key\)"),
        (("sink", "again"), {"public_file": keys / "producer.key"}, "already admitted as producer/producer"),
        (("sink", "junk"), {"public_file": tmp_path / "junk.key"}, "junk.key is not a ZeroMQ certificate"),
        (("sink", "short"), {"public_file": tmp_path / "short.key"}, "not a CURVE key"),
        (("sink", "none"), {"public_file": tmp_path / "absent.key"}, "no public key file"),
    ]
    for (role, name), options, message in refusals:
        with pytest.raises(ConfigError, match=message):
            add_key(keys, role, name, **options)
    assert admitted(keys) == before and not (keys / "clients").exists()
    stray, _ = zmq.auth.create_certificates(str(keys / "authorized"), "stray")  # names no role: admits nobody
    with pytest.raises(ConfigError, match=r"already in .*authorized/stray.key, which admits nobody"):
        add_key(keys, "worker", "stray", public_file=Path(stray))  # a second listing would admit nobody either
    (keys / "authorized" / "stray.key").unlink()
    (keys / "authorized" / "stray.key_secret").unlink()

    with pytest.raises(ConfigError, match="no directory of authorised client keys .*pervade keys init"):
        add_key(tmp_path, "worker", "alice")  # not a keys directory
    (keys / "broker.key").rename(tmp_path / "broker.key")
    with pytest.raises(ConfigError, match="no key file .*broker.key"):
        add_key(keys, "worker", "alice")  # its clients could not trust the broker
    shutil.rmtree(keys / "authorized")
    (tmp_path / "broker.key").rename(keys / "broker.key")
    with pytest.raises(ConfigError, match="no directory of authorised client keys"):
        add_key(keys, "worker", "alice")


def test_list_shows_each_key_by_role_and_the_files_that_admit_nobody(tmp_path: Path) -> None:
    init_keys(tmp_path)
    add_key(tmp_path, "sink", "archive")
    listed, problems = list_keys(tmp_path)
    assert [(str(k.holder), k.file.relative_to(tmp_path).as_posix()) for k in listed] == [
        ("worker/worker", "authorized/worker/worker.key"),
        ("producer/producer", "authorized/producer/producer.key"),
        ("sink/archive", "authorized/sink/archive.key"),
        ("sink/sink", "authorized/sink/sink.key"),
        ("monitor/monitor", "authorized/monitor/monitor.key"),
    ]
    assert problems == ()

    shutil.copyfile(tmp_path / "sink.key", tmp_path / "authorized" / "alice.key")  # names no role
    shutil.copyfile(tmp_path / "producer.key", tmp_path / "authorized" / "monitor" / "twice.key")  # two roles
    listed, problems = list_keys(tmp_path)
    assert [str(k.holder) for k in listed] == ["worker/worker", "sink/archive", "sink/sink", "monitor/monitor"]
    assert len(problems) == 2
    assert "alice.key names no role" in problems[0]
    assert "producer/producer.key" in problems[1] and "monitor/twice.key" in problems[1]

    done = pervade_keys("list", tmp_path)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["ROLE", "NAME", "KEY", "FILE"]
    sink = public_of(tmp_path / "sink.key")
    assert lines[3].split() == ["sink", "sink", sink[:8], str(tmp_path / "authorized" / "sink" / "sink.key")]
    assert [line for line in lines if line.startswith("problem: ")] == [f"problem: {p}" for p in problems]


def test_revoke_removes_the_key_and_the_ring_stops_admitting_it_at_once(tmp_path: Path) -> None:
    init_keys(tmp_path)
    added = add_key(tmp_path, "worker", "alice")
    ring = KeyRing(tmp_path / "authorized")
    assert ring.refresh().holders[added.holder.public] == added.holder
    assert revoke_key(tmp_path, "worker", "alice") == [added.file]
    assert ring.refresh().holders.get(added.holder.public) is None
    assert added.bundle is not None and added.bundle.is_dir()  # left: its secret admits nothing now
    with pytest.raises(ConfigError, match=r"no key worker/alice in .*authorized \(see: pervade keys list"):
        revoke_key(tmp_path, "worker", "alice")
    with pytest.raises(ConfigError, match="unknown role 'workers'"):
        revoke_key(tmp_path, "workers", "worker")
    with pytest.raises(ConfigError, match="bad key name"):
        revoke_key(tmp_path, "worker", "../../broker")  # never a file outside the role's directory
    assert (tmp_path / "broker.key").is_file()


def test_a_revoked_keys_client_directory_gives_way_to_the_name_s_next_key(tmp_path: Path) -> None:
    init_keys(tmp_path)
    first = add_key(tmp_path, "worker", "alice")
    revoke_key(tmp_path, "worker", "alice")
    second = add_key(tmp_path, "worker", "alice")  # a new key for alice: her old client directory is replaced
    assert second.bundle == first.bundle and second.holder.public != first.holder.public
    assert second.bundle is not None
    assert ClientKeys.load(second.bundle, "worker").public.decode() == second.holder.public

    revoke_key(tmp_path, "worker", "alice")
    add_key(tmp_path, "worker", "bob", public_file=second.bundle / "worker.key")  # alice's key, now bob's
    with pytest.raises(ConfigError, match=r"clients/worker/alice holds the keys of worker/bob, still admitted"):
        add_key(tmp_path, "worker", "alice")
    revoke_key(tmp_path, "worker", "bob")
    laptop, _ = zmq.auth.create_certificates(str(tmp_path), "laptop")
    added = add_key(tmp_path, "worker", "alice", public_file=Path(laptop))
    assert added.removed == second.bundle and not second.bundle.exists()  # it would pass for the new key's


def test_a_directory_made_before_roles_keeps_its_roles(tmp_path: Path) -> None:
    make_legacy(tmp_path)
    publics = {role: public_of(tmp_path / f"{role}.key") for role in ROLES}
    listed, problems = list_keys(tmp_path)
    assert problems == ()
    assert [(str(k.holder), k.holder.public, k.file.name) for k in listed] == [
        (f"{role}/{role}", publics[role], f"{role}.key") for role in ROLES
    ]
    assert all(k.file.parent == tmp_path / "authorized" for k in listed)
    assert all(ClientKeys.load(tmp_path, role) for role in ROLES) and ServerKeys.load(tmp_path)

    with pytest.raises(ConfigError, match=r"worker/worker is already a key \(.*authorized/worker.key\)"):
        add_key(tmp_path, "worker", "worker")
    added = add_key(tmp_path, "producer", "night")  # the role's directory is made
    assert added.file == tmp_path / "authorized" / "producer" / "night.key"
    assert mode(added.file.parent) == 0o700
    assert revoke_key(tmp_path, "worker", "worker") == [tmp_path / "authorized" / "worker.key"]
    assert admitted(tmp_path) == {
        "producer/producer": publics["producer"],
        "sink/sink": publics["sink"],
        "monitor/monitor": publics["monitor"],
        "producer/night": added.holder.public,
    }


def test_a_name_listed_twice_admits_neither_key(tmp_path: Path) -> None:
    make_legacy(tmp_path)
    other, _ = zmq.auth.create_certificates(str(tmp_path), "other")
    (tmp_path / "authorized" / "worker").mkdir()
    shutil.copyfile(other, tmp_path / "authorized" / "worker" / "worker.key")  # beside authorized/worker.key
    listing = read_authorized(tmp_path / "authorized")
    assert sorted(str(h) for h in listing.holders.values()) == ["monitor/monitor", "producer/producer", "sink/sink"]
    assert len(listing.problems) == 1 and "two keys under one name" in listing.problems[0]


def test_revoking_a_key_listed_twice_removes_every_copy(tmp_path: Path) -> None:
    init_keys(tmp_path)
    added = add_key(tmp_path, "worker", "rogue")
    copy = tmp_path / "authorized" / "producer" / "rogue-copy.key"
    shutil.copyfile(added.file, copy)  # a backup, or a move never finished: neither admits it now
    assert added.holder.public not in read_authorized(tmp_path / "authorized").holders
    assert revoke_key(tmp_path, "worker", "rogue") == [added.file, copy]
    listing = read_authorized(tmp_path / "authorized")
    assert added.holder.public not in listing.holders and listing.problems == ()


def test_status_reads_with_whichever_role_s_keys_a_directory_holds(tmp_path: Path) -> None:
    init_keys(tmp_path)
    bundle = add_key(tmp_path, "worker", "node17").bundle
    assert bundle is not None
    assert monitor_keys(argparse.Namespace(keys_dir=bundle)) == ClientKeys.load(bundle, "worker")
    assert monitor_keys(argparse.Namespace(keys_dir=tmp_path)) == ClientKeys.load(tmp_path, "monitor")


def test_the_keys_commands_say_what_they_did_and_refuse_in_one_line(tmp_path: Path) -> None:
    init_keys(tmp_path)
    done = pervade_keys("add", tmp_path, "worker", "alice")
    assert done.returncode == 0, done.stderr
    assert (
        "admitted worker/alice" in done.stdout and f"--keys {tmp_path / 'clients' / 'worker' / 'alice'}" in done.stdout
    )

    done = pervade_keys("add", tmp_path, "sink", "alice", "--public", tmp_path / "clients/worker/alice/worker.key")
    assert done.returncode == 2 and done.stdout == ""
    assert (
        done.stderr
        == "pervade keys: error: that public key is already admitted as worker/alice: a key has one role and one name\n"
    )

    done = pervade_keys("revoke", tmp_path, "worker", "alice")
    assert done.returncode == 0, done.stderr
    assert f"removed {tmp_path / 'authorized' / 'worker' / 'alice.key'}" in done.stdout
    assert "cuts every connection of this key within 2 s" in done.stdout and "clients/worker/alice" in done.stdout


async def test_only_authorised_clients_are_served_and_granting_and_revoking_need_no_restart(tmp_path: Path) -> None:
    init_keys(tmp_path / "run")
    server_keys = ServerKeys.load(tmp_path / "run")
    good = ClientKeys.load(tmp_path / "run", "producer")
    stranger_public, stranger_secret = zmq.auth.create_certificates(str(tmp_path), "stranger")
    stranger = ClientKeys(*zmq.auth.load_certificate(stranger_secret), server_public=server_keys.public)  # type: ignore[arg-type]

    ctx = zmq.asyncio.Context()
    auth = AsyncioAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=KeyRing(server_keys.authorized, refresh_s=0.0))
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

        add_key(tmp_path / "run", "producer", "stranger", public_file=Path(stranger_public))  # granted, live
        assert await served(stranger)
        revoke_key(tmp_path / "run", "producer", "producer")  # revoked, live
        assert not await served(good)
    finally:
        echoing.cancel()
        auth.stop()
        server.close(linger=0)
        ctx.term()
