"""CURVE keys of a run: the broker's key pair, a key pair per client role, and the client public keys the
broker admits.

``pervade keys init DIR`` writes, in ZeroMQ's certificate format (``zmq.auth``)::

    DIR/broker.key              the broker's public key: every client needs it, to know it talks to the broker
    DIR/broker.key_secret       the broker's secret key (mode 0600): only on the broker's host
    DIR/ROLE.key                a client role's public key (ROLE: worker, producer, sink, monitor)
    DIR/ROLE.key_secret         that role's secret key (mode 0600): only where that role runs
    DIR/authorized/ROLE/ROLE.key  the public keys the broker admits, each as its role (pervade/keyring.py)

``pervade keys add DIR ROLE NAME`` admits one more key of a role, under a name of its own::

    DIR/authorized/ROLE/NAME.key  its public key, which the broker admits as ROLE/NAME
    DIR/clients/ROLE/NAME/      what that client runs with (``--keys DIR/clients/ROLE/NAME``): ``broker.key``,
                                ``ROLE.key`` and ``ROLE.key_secret`` (mode 0600); none with ``--public FILE``

``pervade keys list DIR`` shows the admitted keys and the files that admit nobody; ``pervade keys revoke DIR
ROLE NAME`` deletes the key's file, which a running broker notices at once. Those three are
``pervade/keyadmin.py``.

One key pair per role, so that the producers' key can be revoked without stopping the workers, and so that
a worker node holds no key but the workers'. A worker's file service serves under its worker key and admits
worker keys only (``PeerAdmission``). A client loads its keys from a directory holding ``ROLE.key_secret``
and ``broker.key``; the broker from one holding ``broker.key_secret`` and ``authorized/``. The directory comes from a flag or from
``$PERVADE_KEYS``. Secret files readable by group or others are refused: on a cluster the home directory is
on a shared file system that other users can read.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from pervade.errors import ConfigError
from pervade.keyring import KeyRing, Role

#: The environment variable naming the keys directory when no flag does.
KEYS_ENV = "PERVADE_KEYS"
BROKER = "broker"
#: The client roles, each with a key pair of its own.
ROLES = tuple(role.value for role in Role)
AUTHORIZED = "authorized"


def keys_dir(flag: Path | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """The keys directory from a flag, else from ``$PERVADE_KEYS``; None when neither names one."""
    environ = os.environ if environ is None else environ
    if flag is not None:
        return flag
    value = environ.get(KEYS_ENV, "").strip()
    return Path(value) if value else None


def init_keys(directory: Path, force: bool = False) -> list[Path]:
    """Create the broker's key pair and one per client role, and authorise the roles; the files written.
    Refuses to replace existing keys unless ``force`` (clients holding the old keys would then be refused)."""
    names = [f"{name}{suffix}" for name in (BROKER, *ROLES) for suffix in (".key", ".key_secret")]
    existing = [name for name in names if (directory / name).exists()]
    if existing and not force:
        raise ConfigError(f"{directory} already holds keys ({', '.join(existing)}); --force replaces them")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    authorized = directory / AUTHORIZED
    if force and authorized.exists():
        shutil.rmtree(authorized)  # the old client keys would still be admitted otherwise
    authorized.mkdir(mode=0o700)
    for role in ROLES:
        (authorized / role).mkdir(mode=0o700)
    written = []
    for name in (BROKER, *ROLES):
        for path in (directory / f"{name}.key", directory / f"{name}.key_secret"):
            path.unlink(missing_ok=True)
        public, secret = zmq.auth.create_certificates(str(directory), name)
        Path(secret).chmod(0o600)
        written += [Path(public), Path(secret)]
    for role in ROLES:
        shutil.copyfile(directory / f"{role}.key", authorized / role / f"{role}.key")
        written.append(authorized / role / f"{role}.key")
    return written


def _certificate(path: Path) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise ConfigError(f"no key file {path} (create keys with: pervade keys init DIR)")
    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a ZeroMQ certificate: {exc}") from None


def load_public(path: Path) -> bytes:
    """The public key (Z85) in a certificate file."""
    return _certificate(path)[0]


def load_key_pair(path: Path) -> tuple[bytes, bytes]:
    """The public and secret keys (Z85) in a secret certificate file, refused if others can read it."""
    if path.is_file() and stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise ConfigError(f"{path} is readable by others: chmod 600 {path}")
    public, secret = _certificate(path)
    if not secret:
        raise ConfigError(f"{path} holds no secret key")
    return public, secret


@dataclass(frozen=True)
class ClientKeys:
    """What a client (worker, producer, sink, peer downloader) needs: its role's key pair and the server's
    public key; and, for a worker's file service, the directory of client keys its peers may use (if any)."""

    public: bytes
    secret: bytes
    server_public: bytes
    authorized: Path | None = None

    @classmethod
    def load(cls, directory: Path, role: str, server: str = BROKER) -> ClientKeys:
        if role not in ROLES:
            raise ConfigError(f"unknown client role {role!r}; one of {', '.join(ROLES)}")
        public, secret = load_key_pair(directory / f"{role}.key_secret")
        authorized = directory / AUTHORIZED if (directory / AUTHORIZED).is_dir() else None
        return cls(
            public=public, secret=secret, server_public=load_public(directory / f"{server}.key"), authorized=authorized
        )

    def for_peers(self) -> ClientKeys:
        """As a downloader from a peer's file service. The workers of a run share the worker key pair, so
        a peer's server key is this key's public half."""
        return ClientKeys(public=self.public, secret=self.secret, server_public=self.public, authorized=self.authorized)

    def apply_server(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (a worker's file service) a CURVE server under this key pair; call before ``bind``."""
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client of the server; call before ``connect``."""
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server_public


@dataclass(frozen=True)
class ServerKeys:
    """What a CURVE server needs: its key pair, and where the public keys it admits are."""

    public: bytes
    secret: bytes
    authorized: Path

    @classmethod
    def load(cls, directory: Path, name: str = BROKER) -> ServerKeys:
        public, secret = load_key_pair(directory / f"{name}.key_secret")
        authorized = directory / AUTHORIZED
        if not authorized.is_dir():
            raise ConfigError(f"no directory of authorised client keys at {authorized}")
        return cls(public=public, secret=secret, authorized=authorized)

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server; call before ``bind``."""
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


class PeerAdmission:
    """Whom a worker's file service admits: worker keys only. Its own key, and the worker keys the broker says
    it admits (``vouch``, from the broker's ``PeerKeys``: what lets a node that holds nothing but its own key
    pair serve nodes holding others). Until the broker has said, any worker key in the keys directory's
    ``authorized/worker/`` (or a pre-roles ``authorized/worker.key``) when the worker has that directory. A
    producer's, sink's or monitor's key is refused, and so is a worker key the broker stopped vouching for
    (revoked), on its next connection."""

    def __init__(self, keys: ClientKeys) -> None:
        self.own = keys.public
        self.ring = KeyRing(keys.authorized, roles=frozenset({Role.WORKER})) if keys.authorized is not None else None
        #: The worker keys the broker admits, once it said (None before): from then on they replace the local
        #: directory, which may be a stale copy still listing a key the broker revoked.
        self.vouched: frozenset[bytes] | None = None

    def vouch(self, keys: list[str]) -> None:
        """The worker keys the broker admits now (Z85), replacing what it said before."""
        self.vouched = frozenset(key.encode("ascii") for key in keys)

    async def callback(self, domain: str, key: bytes) -> bool:
        if key == self.own:
            return True
        if self.vouched is not None:
            return key in self.vouched
        return self.ring is not None and await self.ring.callback(domain, key)


# `pervade keys add | list | revoke`: the operator's view of authorized/, one key of one role at a time.
