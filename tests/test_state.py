"""The broker's state directory: one broker at a time, a damaged database refused with what to do, and a
write-ahead log that lost commits detected and reported."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import zmq.asyncio

from pervade.broker.config import BrokerConfig
from pervade.broker.server import Broker
from pervade.broker.store import STORE_FILE, BrokerStore, state_error
from pervade.broker.wal import scan_log
from pervade.errors import ConfigError, StateError
from tests.test_broker import batch


def fingerprint(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_a_second_broker_on_a_live_state_is_refused_and_touches_nothing(tmp_path) -> None:
    state = tmp_path / "state"
    live = BrokerStore.open(state)
    live.note_endpoint("tcp://127.0.0.1:5555")
    for n in range(3):
        live.add(batch("j1", n))
    live.assign(live.next_queued(batch("j1", 0).context.context_id), b"w")  # an assignment recovery would undo
    live.commit()
    before = fingerprint(state)
    with pytest.raises(StateError, match=rf"in use by another broker \(pid {os.getpid()} on .*tcp://127.0.0.1:5555"):
        BrokerStore.open(state)
    assert fingerprint(state) == before
    live.close()
    again = BrokerStore.open(state)  # released with the broker that held it
    again.close()


async def test_a_broker_that_cannot_bind_releases_its_state(tmp_path) -> None:
    ctx = zmq.asyncio.Context()
    taken = ctx.socket(zmq.ROUTER)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        broker = Broker(BrokerConfig(bind=f"tcp://127.0.0.1:{port}", state_dir=tmp_path / "s"), ctx=ctx)
        with pytest.raises(ConfigError, match=f"cannot listen on tcp://127.0.0.1:{port}"):
            broker.start()
        BrokerStore.open(tmp_path / "s").close()  # the lock went with the failed start
    finally:
        taken.close()
        ctx.term()


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / STORE_FILE).write_bytes(os.urandom(8192))
    with pytest.raises(StateError, match=r"damaged or not a pervade state .*file is not a database.*\(mv .* --state"):
        BrokerStore.open(state)
    BrokerStore.open(tmp_path / "other").close()  # and the refused directory's lock is not left held
    with pytest.raises(StateError):
        BrokerStore.open(state)


def crashed_copy(state: Path, commits: int, tmp_path: Path) -> Path:
    """The state directory as a broker killed after ``commits`` commits leaves it: database and log as they
    are while it runs (copied without closing the store)."""
    store = BrokerStore.open(state)
    for n in range(commits):
        store.add(batch("j1", n))
        store.commit()
    copy = tmp_path / "crashed"
    shutil.copytree(state, copy)
    store.close()
    (copy / "broker.lock").unlink()
    return copy


def test_a_log_that_lost_commits_is_detected_and_an_intact_one_is_not(tmp_path) -> None:
    crashed = crashed_copy(tmp_path / "state", commits=200, tmp_path=tmp_path)
    wal = crashed / (STORE_FILE + "-wal")
    scan = scan_log(wal)
    assert scan is not None and scan.header_ok and len(scan.commit_frames) >= 200

    intact = tmp_path / "intact"
    shutil.copytree(crashed, intact)
    store = BrokerStore.open(intact)
    assert store.damage is None and store.status_counts  # every commit replayed
    assert sum(store.queued.values()) == 200
    store.close()

    torn = tmp_path / "torn"  # killed in the middle of writing its last transaction: nothing was lost
    shutil.copytree(crashed, torn)
    with open(torn / (STORE_FILE + "-wal"), "r+b") as handle:
        handle.truncate(handle.seek(0, 2) - 100)
    store = BrokerStore.open(torn)
    assert store.damage is None and sum(store.queued.values()) == 199
    store.close()

    with open(wal, "r+b") as handle:  # random bytes in the middle of the log
        handle.seek(handle.seek(0, 2) // 2)
        handle.write(os.urandom(4096))
    damaged_log = wal.read_bytes()
    store = BrokerStore.open(crashed)
    # never trusted: set aside whole, and the broker starts afresh (its producers resubmit), saying so
    assert store.damage is not None and "commit(s) after frame" in store.damage and "producers resubmit" in store.damage
    assert sum(store.queued.values()) == 0 and store.jobs() == {}
    (aside,) = crashed.glob("damaged-*")
    assert (aside / STORE_FILE).exists() and str(aside) in store.damage  # kept for a post-mortem...
    assert (aside / (STORE_FILE + "-wal")).read_bytes() == damaged_log  # ...the log as it was found
    store.close()


def test_a_full_disk_under_the_state_is_not_taken_for_damage(tmp_path) -> None:
    """SQLite's own "database or disk is full" (SQLITE_FULL): keep the state, fix the cause; only a file
    that is not, or no longer, a database is to be set aside."""
    path = tmp_path / STORE_FILE
    db = sqlite3.connect(path)
    db.execute("PRAGMA max_page_count = 2")  # a database that cannot grow: as full as a full disk
    with pytest.raises(sqlite3.Error) as full:
        for n in range(100):
            db.execute(f"CREATE TABLE t{n} (x)")
    message = str(state_error(path, full.value))
    assert (
        "SQLITE_FULL" in message and "start the broker again on the same --state; nothing it holds is lost" in message
    )
    assert "damaged" not in message
