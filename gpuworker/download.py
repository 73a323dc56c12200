"""One download's bookkeeping: the pieces of a manifest still missing from the node cache, the partial files
they are written into, and which source served a piece corrupted (never asked for that piece again).
``gpuworker/fetch.py`` fills it from peers and the origin."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import deque

from pervade.gpuworker.cache import FileCache
from pervade.manifest import FileEntry, Manifest

#: (index of the file in the download, index of the piece in the file)
PieceKey = tuple[int, int]


class Download:
    """The pieces of one manifest still missing from the cache, and the partial files they go into."""

    def __init__(self, cache: FileCache, manifest: Manifest, entries: list[FileEntry]) -> None:
        self.cache = cache
        self.manifest = manifest
        self.entries = entries
        self.partials = [cache.partial_path(e) for e in entries]
        self._fds = []
        for entry, path in zip(entries, self.partials, strict=True):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(fd, entry.size)
            self._fds.append(fd)
        self.todo: deque[PieceKey] = deque(
            (f, p) for f, e in enumerate(entries) for p in range(manifest.piece_count(e))
        )
        self.left = [manifest.piece_count(e) for e in entries]
        self.avoid: dict[PieceKey, set[str]] = {}
        self._index = {e.path: i for i, e in enumerate(entries)}

    @property
    def finished(self) -> bool:
        return not any(self.left)

    def file_index(self, path: str) -> int | None:
        return self._index.get(path)

    def span(self, key: PieceKey) -> tuple[int, int]:
        return self.manifest.piece_span(self.entries[key[0]], key[1])

    def chunks(self, key: PieceKey, chunk_bytes: int) -> list[tuple[PieceKey, int, int]]:
        """The requests a piece is fetched in: (piece, offset, length), ``chunk_bytes`` at most each (an
        empty file's one piece is one request)."""
        offset, length = self.span(key)
        starts = range(offset, offset + max(length, 1), chunk_bytes)
        return [(key, start, min(chunk_bytes, offset + length - start)) for start in starts]

    def take(self, source: str) -> PieceKey | None:
        """The next piece for ``source`` (never one it already served corrupted)."""
        for _ in range(len(self.todo)):
            key = self.todo.popleft()
            if source not in self.avoid.get(key, ()):
                return key
            self.todo.append(key)
        return None

    def give_back(self, key: PieceKey, bad_source: str | None = None) -> None:
        if bad_source is not None:
            self.avoid.setdefault(key, set()).add(bad_source)
        self.todo.appendleft(key)

    def verify_and_write(self, key: PieceKey, data: bytes | bytearray | memoryview) -> bool:
        """Check a piece against the manifest and write it if it matches. Blocking: run on a thread."""
        entry = self.entries[key[0]]
        offset, length = self.span(key)
        if len(data) != length or hashlib.sha256(data).digest() != entry.pieces[key[1]]:
            return False
        os.pwrite(self._fds[key[0]], data, offset)
        return True

    async def piece_done(self, key: PieceKey) -> None:
        """Count a written piece; a file whose pieces are all in goes into the cache (on a thread)."""
        index = key[0]
        self.left[index] -= 1
        if self.left[index] == 0:
            fd, self._fds[index] = self._fds[index], -1  # counted here, on the loop: ``close`` skips it
            await asyncio.to_thread(self._commit, index, fd)

    def _commit(self, index: int, fd: int) -> None:
        os.close(fd)
        self.cache.commit_blob(self.entries[index], self.partials[index])

    def adopt_cached(self) -> int:
        """Files another worker of this node put in the cache meanwhile: done without fetching. Returns
        their bytes. Blocking: run on a thread."""
        adopted = 0
        for index, entry in enumerate(self.entries):
            if self.left[index] and self.cache.has_blob(entry):
                os.close(self._fds[index])
                self._fds[index] = -1
                self.partials[index].unlink(missing_ok=True)
                self.left[index] = 0
                adopted += entry.size
        if adopted:
            self.todo = deque(k for k in self.todo if self.left[k[0]])
        return adopted

    def close(self) -> None:
        """Drop what was not completed (a killed fetch leaves no partial file behind)."""
        for fd, path in zip(self._fds, self.partials, strict=True):
            if fd >= 0:
                os.close(fd)
                path.unlink(missing_ok=True)
        self._fds = [-1] * len(self._fds)
