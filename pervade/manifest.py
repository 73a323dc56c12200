"""Content-addressed model files: a manifest lists a context's files (relative path, size, sha256, and the
sha256 of each fixed-size piece), and its digest names it.

The piece hashes let a downloader check every few MiB as they arrive from a peer, so a corrupted or
tampered chunk costs one piece re-fetched from someone else, not a whole multi-GB file. The digest covers
everything in the manifest, so two directories with the same bytes get the same digest wherever they live,
and a manifest cannot be altered without changing its name.

Paths in a manifest are checked once, here: relative, normalised, no ``..``, no hidden components. Nothing
that serves or stores files ever joins a path it received from the network.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Annotated

import msgspec

from pervade.errors import ConfigError

#: Bytes per piece (each piece is verified on its own). 4 MiB: a 3.4 GB model has ~850 pieces, 27 KB of
#: hashes; a bad piece costs 4 MiB to fetch again.
DEFAULT_PIECE_SIZE = 4 * 1024 * 1024
#: Files a manifest may list; a model directory has tens.
MAX_FILES = 10_000

#: A model directory's files that are never part of the model: VCS data, caches, docs.
_IGNORED_NAMES = {".gitattributes", ".gitignore", "README.md", "LICENSE", "LICENSE.txt"}

Sha256 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
RelativePath = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]


class FileEntry(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True):
    """One file of a context: where it goes relative to the model directory, and its content."""

    path: RelativePath
    size: Annotated[int, msgspec.Meta(ge=0)]
    sha256: Sha256
    #: sha256 of each ``piece_size`` slice of the file, in order (the last may be shorter).
    pieces: list[Sha256]

    @property
    def blob_name(self) -> str:
        """The name the file's bytes are stored under: its content hash."""
        return self.sha256.hex()


class Manifest(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True):
    """Every file of a context, sorted by path."""

    files: Annotated[list[FileEntry], msgspec.Meta(min_length=1, max_length=MAX_FILES)]
    piece_size: Annotated[int, msgspec.Meta(ge=64 * 1024, le=256 * 1024 * 1024)] = DEFAULT_PIECE_SIZE

    @property
    def digest(self) -> str:
        """The manifest's name: sha256 of its canonical encoding."""
        return hashlib.sha256(msgspec.msgpack.encode(self)).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def by_path(self) -> dict[str, FileEntry]:
        return {f.path: f for f in self.files}

    def piece_count(self, entry: FileEntry) -> int:
        return max(1, -(-entry.size // self.piece_size))

    def piece_span(self, entry: FileEntry, index: int) -> tuple[int, int]:
        """(offset, length) of piece ``index`` of ``entry``."""
        offset = index * self.piece_size
        return offset, max(0, min(self.piece_size, entry.size - offset))

    def validate(self) -> Manifest:
        """Check what the type system cannot: safe paths, consistent pieces, no duplicates."""
        seen: set[str] = set()
        for entry in self.files:
            check_relative_path(entry.path)
            if entry.path in seen:
                raise ConfigError(f"manifest lists {entry.path!r} twice")
            seen.add(entry.path)
            if len(entry.pieces) != self.piece_count(entry):
                raise ConfigError(f"manifest entry {entry.path!r}: {len(entry.pieces)} piece hashes for {entry.size} bytes")
        if [f.path for f in self.files] != sorted(seen):
            raise ConfigError("manifest files must be sorted by path")
        return self


def check_relative_path(path: str) -> str:
    """``path`` if it is a plain relative path inside a directory; else ConfigError."""
    pure = PurePosixPath(path)
    if (
        pure.is_absolute()
        or "\\" in path
        or "\x00" in path
        or str(pure) != path
        or any(part in ("", ".", "..") or part.startswith(".") for part in pure.parts)
    ):
        raise ConfigError(f"unsafe path in manifest: {path!r}")
    return path


def _model_files(directory: Path) -> Iterator[Path]:
    """Regular files of a model directory, hidden directories and repository clutter left out."""
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name not in _IGNORED_NAMES:
                yield Path(root) / name


def hash_file(path: Path, piece_size: int = DEFAULT_PIECE_SIZE) -> tuple[int, bytes, list[bytes]]:
    """(size, sha256, piece hashes) of a file, reading it once. Blocking: call it off the event loop."""
    whole = hashlib.sha256()
    pieces: list[bytes] = []
    size = 0
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(piece_size):
            whole.update(chunk)
            pieces.append(hashlib.sha256(chunk).digest())
            size += len(chunk)
    if not pieces:
        pieces.append(hashlib.sha256(b"").digest())
    return size, whole.digest(), pieces


def build_manifest(directory: Path, piece_size: int = DEFAULT_PIECE_SIZE) -> Manifest:
    """Hash every model file under ``directory``. Blocking (about 1 s per GB): call it off the event loop."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"not a model directory: {directory}")
    entries = []
    for path in _model_files(directory):
        size, sha, pieces = hash_file(path, piece_size)
        entries.append(FileEntry(path=path.relative_to(directory).as_posix(), size=size, sha256=sha, pieces=pieces))
    if not entries:
        raise ConfigError(f"no model files in {directory}")
    entries.sort(key=lambda e: e.path)
    return Manifest(files=entries, piece_size=piece_size).validate()


_json_encoder = msgspec.json.Encoder()
_json_decoder = msgspec.json.Decoder(Manifest)


def manifest_to_json(manifest: Manifest) -> bytes:
    return _json_encoder.encode(manifest)


def manifest_from_json(data: bytes) -> Manifest:
    try:
        return _json_decoder.decode(data).validate()
    except msgspec.DecodeError as exc:
        raise ConfigError(f"invalid manifest: {exc}") from None
