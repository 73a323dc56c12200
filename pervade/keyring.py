"""Whom a keyed broker admits, and as what: every admitted public key belongs to exactly one role.

The operator decides a key's role by where its public key file lies in the keys directory's ``authorized/``::

    authorized/worker/NAME.key      a worker key called NAME (``pervade keys add DIR worker NAME``)
    authorized/producer/NAME.key    a producer key; likewise sink/ and monitor/
    authorized/ROLE.key             a directory made before roles were enforced: the role's own key, called ROLE

Anything else admits nobody and is reported (``KeyListing.problems``): a flat ``authorized/alice.key`` names
no role, and a public key listed twice (under two roles, or two names) would make its role or name
ambiguous, so neither listing admits it; so is a name listed twice (``authorized/worker.key`` beside
``authorized/worker/worker.key``). Secure by default: when in doubt, a key is refused.

``KeyRing`` re-reads the directory when it changes, or at most ``AUTHORIZED_REFRESH_S`` after the last read,
so keys added or removed take effect without a restart. The broker asks it who sent each message (ZeroMQ's
authentication labels every message of a CURVE connection with the client's public key: its ``User-Id``).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import zmq.auth

#: Seconds a listing is trusted before the directory is read again.
AUTHORIZED_REFRESH_S = 1.0
#: What a key's name may be: it becomes a file name, a log field and a Parquet value.
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # use fullmatch: "$" would let a final "\n" in


class Role(StrEnum):
    """What a client key may do (``pervade.roles`` lists the messages each may send)."""

    WORKER = "worker"
    PRODUCER = "producer"
    SINK = "sink"
    MONITOR = "monitor"


@dataclass(frozen=True)
class KeyHolder:
    """Who an admitted public key belongs to: its role and its name (never the secret)."""

    role: Role
    name: str
    #: The public key, Z85 (what ZeroMQ reports as a CURVE connection's ``User-Id``).
    public: str

    def __str__(self) -> str:
        return f"{self.role}/{self.name}"


@dataclass(frozen=True)
class KeyListing:
    """One reading of ``authorized/``: the admitted keys by public key, and the files that admit nobody."""

    holders: Mapping[str, KeyHolder] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    def of_role(self, role: Role) -> frozenset[str]:
        return frozenset(k for k, holder in self.holders.items() if holder.role is role)


def role_of(name: str) -> Role | None:
    try:
        return Role(name)
    except ValueError:
        return None


def read_authorized(directory: Path) -> KeyListing:
    """Read ``directory`` (a keys directory's ``authorized/``). Blocking: call it off the event loop."""
    if not directory.is_dir():
        return KeyListing(problems=(f"{directory} is not a directory: no client key is admitted",))
    problems: list[str] = []
    holders = _unique(_read_keys(_key_files(directory, problems), problems), problems)
    return KeyListing(holders=holders, problems=tuple(problems))


def _key_files(directory: Path, problems: list[str]) -> list[tuple[Role, str, Path]]:
    """Every file that lists a key, with the role and name its place gives it."""
    files = []
    for path in sorted(directory.glob("*.key")):  # before roles were enforced: authorized/ROLE.key
        role = role_of(path.stem)
        if role is None:
            problems.append(f"{path} names no role; move it to {directory}/ROLE/{path.name} (ROLE: {', '.join(Role)})")
        else:
            files.append((role, path.stem, path))
    for role in Role:
        for path in sorted((directory / role.value).glob("*.key")):
            if KEY_NAME.fullmatch(path.stem):
                files.append((role, path.stem, path))
            else:
                problems.append(f"{path}: a key's name is letters, digits, '_', '.' and '-', at most 64")
    return files


def _read_keys(files: list[tuple[Role, str, Path]], problems: list[str]) -> list[tuple[KeyHolder, Path]]:
    holders = []
    for role, name, path in files:
        try:
            public = zmq.auth.load_certificate(str(path))[0].decode("ascii")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            problems.append(f"{path} is not a ZeroMQ public key: {exc}")  # half-written, or foreign
            continue
        holders.append((KeyHolder(role, name, public), path))
    return holders


def _unique(listed: list[tuple[KeyHolder, Path]], problems: list[str]) -> dict[str, KeyHolder]:
    """The keys listed once, under a name listed once: a key has one role and one name, and a name names one
    key (results stamped with it could come from either otherwise)."""
    by_key: dict[str, list[tuple[KeyHolder, Path]]] = {}
    by_name: dict[str, list[tuple[KeyHolder, Path]]] = {}
    for holder, path in listed:
        by_key.setdefault(holder.public, []).append((holder, path))
        by_name.setdefault(str(holder), []).append((holder, path))
    ambiguous = {
        holder.public for group in (*by_key.values(), *by_name.values()) if len(group) > 1 for holder, _ in group
    }
    for group in (*by_key.values(), *by_name.values()):
        if len(group) > 1:
            paths = " and ".join(str(path) for _, path in group)
            problems.append(f"{paths} list one key twice, or two keys under one name: none of them is admitted")
    return {holder.public: holder for holder, _ in listed if holder.public not in ambiguous}


class KeyRing:
    """The admitted keys of an ``authorized/`` directory, read again as it changes.

    ``refresh`` (blocking) reads the directory when it changed, or when the last reading is older than
    ``refresh_s``; ``listing`` is the last reading, safe to consult on an event loop. ``callback`` is what a
    ZeroMQ authenticator asks (``roles``: the roles it admits; all by default)."""

    def __init__(
        self, directory: Path, refresh_s: float = AUTHORIZED_REFRESH_S, roles: frozenset[Role] = frozenset(Role)
    ) -> None:
        self.directory = directory
        self.refresh_s = refresh_s
        self.roles = roles
        self.listing = KeyListing()
        self._read_at = float("-inf")
        self._stamp: tuple[int, ...] = ()
        #: The authenticator's thread and the broker's key guard both refresh: one reading at a time, so an
        #: older reading never lands after a newer one (and re-admits a key just revoked).
        self._reading = threading.Lock()

    def _changed_stamp(self) -> tuple[int, ...]:
        """The modification times of ``authorized/`` and its role directories: a file added to or removed
        from any of them changes one."""
        stamp = []
        for path in (self.directory, *(self.directory / role.value for role in Role)):
            try:
                stamp.append(path.stat().st_mtime_ns)
            except OSError:
                stamp.append(0)
        return tuple(stamp)

    def refresh(self) -> KeyListing:
        """The admitted keys now. Blocking: call it off the event loop."""
        with self._reading:
            stamp = self._changed_stamp()
            if stamp != self._stamp or time.monotonic() - self._read_at > self.refresh_s:
                self.listing = read_authorized(self.directory)
                self._stamp, self._read_at = stamp, time.monotonic()
            return self.listing

    def holder(self, public: str) -> KeyHolder | None:
        """Who holds ``public`` (Z85), by the last reading; None when it is not admitted (any more)."""
        return self.listing.holders.get(public)

    async def callback(self, domain: str, key: bytes) -> bool:
        """Whether to admit a connecting client (the authenticator awaits it; the directory is read on a
        thread, never on the event loop)."""
        holder = (await asyncio.to_thread(self.refresh)).holders.get(key.decode("ascii", "replace"))
        return holder is not None and holder.role in self.roles
