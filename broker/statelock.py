"""One broker per state directory: an exclusive lock taken before the state is opened.

Two brokers on one ``--state`` would each recover the other's assignments and deliveries and then fight
over the database. The lock is ``flock`` on ``DIR/broker.lock``, held for the broker's life and released by
the kernel when the process ends however it ends (no stale lock after a SIGKILL). Whoever holds it wrote
who they are into the file, so a refused broker can say which broker runs there.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from pervade.errors import StateError

LOCK_FILE = "broker.lock"


class StateLock:
    """Held from ``acquire`` until ``release`` (or the process ends)."""

    def __init__(self, path: Path, descriptor: int) -> None:
        self.path = path
        self._descriptor: int | None = descriptor

    @classmethod
    def acquire(cls, state_dir: Path, endpoint: str = "") -> StateLock:
        """Lock ``state_dir``, or raise StateError naming the broker that holds it. Touches nothing else."""
        path = state_dir / LOCK_FILE
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(path)
            os.close(descriptor)
            raise StateError(
                f"the state directory {state_dir} is in use by another broker ({holder}); stop that broker first, "
                "or give this one another --state"
            ) from None
        lock = cls(path, descriptor)
        lock.note(endpoint)
        return lock

    def note(self, endpoint: str) -> None:
        """Record who holds the lock (read by a broker that is refused)."""
        assert self._descriptor is not None
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "endpoint": endpoint}
        os.ftruncate(self._descriptor, 0)
        os.pwrite(self._descriptor, json.dumps(owner).encode(), 0)

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the descriptor releases the flock
            self._descriptor = None


def _describe(path: Path) -> str:
    try:
        owner = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["since"]))
        where = f", listening on {owner['endpoint']}" if owner.get("endpoint") else ""
        return f"pid {owner['pid']} on {owner['host']}, started {since}{where}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its details are unreadable"
