"""``pervade keys add | list | revoke``: admitting one more client key as a role and a name, listing what is
admitted, and revoking a key (the layout is ``pervade/keys.py``'s; what a listing admits is
``pervade/keyring.py``'s). Files are written whole or not at all, so a broker reading the directory while a key
is added never sees half a key.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from pervade.errors import ConfigError
from pervade.keyring import KEY_NAME, KeyHolder, Role, read_authorized, role_of
from pervade.keys import AUTHORIZED, BROKER, ROLES, load_public

#: Where ``pervade keys add`` puts a new key's client bundle: ``clients/ROLE/NAME/``.
CLIENTS = "clients"


@dataclass(frozen=True)
class AddedKey:
    """What ``add_key`` wrote."""

    holder: KeyHolder
    #: The public key's file in ``authorized/``: while it exists, the broker admits the key.
    file: Path
    #: The client's keys directory (``--keys`` it); None when an existing public key was admitted.
    bundle: Path | None
    #: A revoked key's client directory of the same name, removed (it would pass for the new key's).
    removed: Path | None = None


@dataclass(frozen=True)
class ListedKey:
    """An admitted key and the file in ``authorized/`` that admits it."""

    holder: KeyHolder
    file: Path


def client_dir(directory: Path, role: str, name: str) -> Path:
    """Where ``pervade keys add`` writes the client keys of ROLE/NAME."""
    return directory / CLIENTS / role / name


def key_files(authorized: Path, role: Role, name: str) -> list[Path]:
    """The files in ``authorized`` that list the key ROLE/NAME: ``ROLE/NAME.key``, and in a directory made
    before roles were enforced, ``ROLE.key`` when NAME is ROLE."""
    candidates = [authorized / role.value / f"{name}.key"]
    if name == role.value:
        candidates.append(authorized / f"{role.value}.key")
    return [path for path in candidates if path.is_file()]


def add_key(directory: Path, role: str, name: str, public_file: Path | None = None) -> AddedKey:
    """Admit one more key as ROLE/NAME: a new key pair, whose client keys go to ``clients/ROLE/NAME/``, or with
    ``public_file`` a public key made elsewhere (no secret is written). Refuses a name already used in the role
    and a public key already admitted: a key has one role and one name."""
    holder_role, name = _role(role), _key_name(name)
    authorized = _authorized(directory)
    broker_public = load_public(directory / f"{BROKER}.key")  # every client needs it: refuse a directory without
    taken = key_files(authorized, holder_role, name)
    if taken:
        raise ConfigError(
            f"{holder_role}/{name} is already a key ({taken[0]}): choose another name, or revoke it first"
        )
    secret = None
    if public_file is None:
        public, secret = zmq.curve_keypair()
    else:
        public = _public_in(public_file)
    holders = read_authorized(authorized).holders
    admitted = holders.get(public.decode("ascii"))
    if admitted is not None:
        raise ConfigError(f"that public key is already admitted as {admitted}: a key has one role and one name")
    listed = [path for path in _listed_files(authorized) if _public_or_none(path) == public.decode("ascii")]
    if listed:  # in a file that admits nobody: one more listing would still be ambiguous, and admit nobody
        raise ConfigError(f"that public key is already in {listed[0]}, which admits nobody: see pervade keys list")
    bundle = client_dir(directory, holder_role.value, name)
    stale = _revoked_bundle(bundle, holder_role, holders)
    if secret is not None:
        _write_bundle(bundle, holder_role, public, secret, broker_public)  # replaces a stale one
    elif stale is not None:
        shutil.rmtree(stale)
    (authorized / holder_role.value).mkdir(mode=0o700, exist_ok=True)  # a directory made before roles: none yet
    file = authorized / holder_role.value / f"{name}.key"
    _write_whole(file, _certificate_text(public), 0o644)  # last: the key is admitted once its client keys exist
    return AddedKey(
        KeyHolder(holder_role, name, public.decode("ascii")), file, bundle if secret else None, removed=stale
    )


def list_keys(directory: Path) -> tuple[list[ListedKey], tuple[str, ...]]:
    """The admitted keys of a keys directory (by role, then name), and the files that admit nobody and why."""
    if not directory.is_dir():
        raise ConfigError(f"no keys directory {directory}")
    authorized = directory / AUTHORIZED
    listing = read_authorized(authorized)
    listed = []
    for holder in listing.holders.values():
        files = [
            path for path in key_files(authorized, holder.role, holder.name) if _public_or_none(path) == holder.public
        ]
        listed.append(ListedKey(holder, files[0] if files else authorized / holder.role.value / f"{holder.name}.key"))
    roles = list(Role)
    listed.sort(key=lambda key: (roles.index(key.holder.role), key.holder.name))
    return listed, listing.problems


def revoke_key(directory: Path, role: str, name: str) -> list[Path]:
    """Stop admitting ROLE/NAME: delete every file that lists it, and every other file that lists the same
    public key (under another name or role: deleting one copy of a key listed twice would admit the other);
    the files deleted. Its client keys, if any, are left: their secret admits nothing now."""
    holder_role, name = _role(role), _key_name(name)
    authorized = _authorized(directory)
    files = key_files(authorized, holder_role, name)
    if not files:
        raise ConfigError(f"no key {holder_role}/{name} in {authorized} (see: pervade keys list {directory})")
    publics = {_public_or_none(path) for path in files} - {None}
    copies = [path for path in _listed_files(authorized) if path not in files and _public_or_none(path) in publics]
    for path in [*files, *copies]:
        path.unlink()
    return [*files, *copies]


def _role(role: str) -> Role:
    found = role_of(role)
    if found is None:
        raise ConfigError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    return found


def _key_name(name: str) -> str:
    if not KEY_NAME.fullmatch(name):  # fullmatch: "$" alone would let a trailing newline through
        raise ConfigError(
            f"bad key name {name!r}: letters, digits, '_', '.' and '-', first a letter or digit, at most 64"
        )
    return name


def _authorized(directory: Path) -> Path:
    authorized = directory / AUTHORIZED
    if not authorized.is_dir():
        raise ConfigError(
            f"no directory of authorised client keys at {authorized} (create keys with: pervade keys init DIR)"
        )
    return authorized


def _public_in(path: Path) -> bytes:
    """The public key in a certificate file made elsewhere, checked to be a CURVE key."""
    if not path.is_file():
        raise ConfigError(f"no public key file {path}")
    try:
        public = zmq.auth.load_certificate(path)[0]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a ZeroMQ certificate: {exc}") from None
    if not _is_curve_key(public):
        raise ConfigError(f"{path}: its public-key is not a CURVE key (40 characters of Z85)")
    return public


def _is_curve_key(public: bytes) -> bool:
    try:
        return len(public) == 40 and len(z85.decode(public)) == 32
    except Exception:  # pyzmq's decoder fails with KeyError, ValueError or struct.error: none is a key
        return False


def _listed_files(authorized: Path) -> list[Path]:
    """Every key file of ``authorized``, whether it admits anybody or not."""
    return [*authorized.glob("*.key"), *(path for role in Role for path in (authorized / role.value).glob("*.key"))]


def _public_or_none(path: Path) -> str | None:
    try:
        return zmq.auth.load_certificate(path)[0].decode("ascii")
    except (OSError, ValueError):
        return None


def _revoked_bundle(bundle: Path, role: Role, holders: Mapping[str, KeyHolder]) -> Path | None:
    """``bundle`` when a revoked key's client keys are there (the name is free again, so its key is not
    listed under it); refused when its key is still admitted, under another name or role."""
    if not bundle.exists():
        return None
    public = _public_or_none(bundle / f"{role.value}.key_secret") or _public_or_none(bundle / f"{role.value}.key")
    holder = holders.get(public) if public is not None else None
    if holder is not None:
        raise ConfigError(f"{bundle} holds the keys of {holder}, still admitted: revoke it or choose another name")
    return bundle


def _write_bundle(bundle: Path, role: Role, public: bytes, secret: bytes, broker_public: bytes) -> None:
    """Write a client's keys directory whole (a temporary directory, renamed), mode 0700, its secret 0600."""
    for parent in (bundle.parent.parent, bundle.parent):
        parent.mkdir(mode=0o700, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=bundle.parent, prefix=f".{bundle.name}.", suffix=".tmp"))  # mode 0700
    try:
        _write_whole(staging / f"{BROKER}.key", _certificate_text(broker_public), 0o644)
        _write_whole(staging / f"{role.value}.key", _certificate_text(public), 0o644)
        _write_whole(staging / f"{role.value}.key_secret", _certificate_text(public, secret), 0o600)
        if bundle.exists():
            shutil.rmtree(bundle)
        staging.rename(bundle)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _certificate_text(public: bytes, secret: bytes | None = None) -> str:
    """A certificate in ZeroMQ's format (what ``zmq.auth.load_certificate`` reads)."""
    kind = "**Secret** Certificate: never give it to anyone" if secret else "Public Certificate"
    lines = [f"#   ZeroMQ CURVE {kind} (pervade keys add)", "", "metadata", "curve"]
    lines.append(f'    public-key = "{public.decode("ascii")}"')
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def _write_whole(path: Path, text: str, mode: int) -> None:
    """Write ``path`` whole or not at all: a broker reading the directory never sees half a key. The temporary
    file is private from the start (mkstemp: 0600) and named so that no reader takes it for a key."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
