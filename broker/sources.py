"""Which workers hold which model files, and whom a bootstrapping worker should fetch from.

The broker's map of files (by manifest digest) to the workers whose node cache holds them, and the rule
that spreads downloads so that N workers joining a run read the origin about once in total:

- Peers first. A worker asking for files gets up to ``max_sources`` holders, least busy first, each below
  ``max_uploads_per_peer`` downloads at once. It fetches from all of them in parallel.
- Every finished download adds a source (``held``), so the number of sources doubles with each round:
  eight workers need about three rounds of peer transfers, not eight reads of the shared file system.
- The origin once. When nobody holds the files, the first worker to ask reads the origin; the others wait
  for it (they are answered the moment it finishes) rather than all reading the origin at once. If it dies,
  a waiting worker takes over the origin read.
- When every holder is saturated, the asker waits for the next slot or the next new source.
- Each source comes with its public key on a keyed broker (the key it registered with): workers may hold
  keys of their own, so a downloader must know which server key each peer's file service answers under.

Pure bookkeeping: the broker calls these verbs and sends the ``Sources`` answers they return.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pervade.protocol import Sources

#: (who asked, the answer to send them)
Answer = tuple[bytes, Sources]


@dataclass
class _Request:
    worker: bytes
    exclude: set[str]


@dataclass
class FileSources:
    max_uploads_per_peer: int = 4
    max_sources: int = 4
    #: digest -> {worker identity: its file endpoint}
    holders: dict[str, dict[bytes, str]] = field(default_factory=dict)
    #: worker identity -> downloads it is serving now
    uploads: Counter[bytes] = field(default_factory=Counter)
    #: (downloader, digest) -> the holders it was given
    assigned: dict[tuple[bytes, str], list[bytes]] = field(default_factory=dict)
    #: digest -> the worker reading it from the origin
    origin_readers: dict[str, bytes] = field(default_factory=dict)
    #: digest -> workers waiting for a source
    waiting: dict[str, list[_Request]] = field(default_factory=dict)
    #: workers that serve nobody (leaving): never named as a source
    retired: set[bytes] = field(default_factory=set)
    #: worker identity -> the public key (Z85) its file service serves under; empty on a broker without keys
    keys: dict[bytes, str] = field(default_factory=dict)
    #: digests whose upload slots were released since the last ``wake``
    _wake_later: set[str] = field(default_factory=set)

    def find(self, worker: bytes, digest: str, exclude: list[str]) -> Sources | None:
        """The answer to a FindSources now, or None: the worker waits, and ``held``/``finished``/``forget``
        answer it later."""
        self._release(worker, digest)
        request = _Request(worker, set(exclude))
        answer = self._answer(request, digest)
        if answer is None:
            waiting = self.waiting.setdefault(digest, [])
            waiting[:] = [r for r in waiting if r.worker != worker] + [request]
        return answer

    def _answer(self, request: _Request, digest: str) -> Sources | None:
        candidates = [
            (self.uploads[w], endpoint, w)
            for w, endpoint in self.holders.get(digest, {}).items()
            if w != request.worker and w not in self.retired and endpoint not in request.exclude
        ]
        free = sorted(c for c in candidates if c[0] < self.max_uploads_per_peer)[: self.max_sources]
        if free:
            chosen = [w for _, _, w in free]
            self.assigned[(request.worker, digest)] = chosen
            self.uploads.update(chosen)
            return Sources(files=digest, peers=[endpoint for _, endpoint, _ in free], peer_keys=self._keys_of(chosen))
        if candidates:
            return None  # holders exist but are all busy: wait for a slot
        reader = self.origin_readers.get(digest)
        if reader is not None and reader != request.worker:
            return None  # someone is reading the origin already: wait for them to finish
        self.origin_readers[digest] = request.worker
        return Sources(files=digest, origin=True)

    def _keys_of(self, chosen: list[bytes]) -> list[str]:
        """The public keys of ``chosen``, in order, when all are known; else none (a broker without keys:
        the peers then share the run's worker key)."""
        keys = [self.keys.get(w, "") for w in chosen]
        return keys if all(keys) else []

    def held(self, worker: bytes, endpoint: str, digests: list[str], key: str = "") -> list[Answer]:
        """``worker`` holds these files now (a finished download, or a registration); ``key``: the public
        key (Z85) it registered with, "" on a broker without keys."""
        if key:
            self.keys[worker] = key
        for digest in digests:
            self._release(worker, digest)
            if self.origin_readers.get(digest) == worker:
                del self.origin_readers[digest]
            if endpoint:
                self.holders.setdefault(digest, {})[worker] = endpoint
        return self._wake(digests)

    def abandon(self, worker: bytes, digest: str) -> list[Answer]:
        """``worker`` gave up fetching ``digest`` (its load failed): free its slots, and if it was the
        origin reader, let a waiting worker read the origin instead."""
        self._release(worker, digest)
        if self.origin_readers.get(digest) == worker:
            del self.origin_readers[digest]
        return self._wake([digest])

    def dropped(self, worker: bytes, digests: list[str]) -> None:
        for digest in digests:
            self.holders.get(digest, {}).pop(worker, None)

    def retire(self, worker: bytes) -> None:
        """A leaving worker: named as a source no more."""
        self.retired.add(worker)

    def forget(self, worker: bytes) -> list[Answer]:
        """A worker left or died: it neither holds, serves, reads nor waits any more."""
        touched = set()
        for digest, holders in self.holders.items():
            if holders.pop(worker, None) is not None:
                touched.add(digest)
        for key in [k for k in self.assigned if k[0] == worker]:
            self._release(*key)
            touched.add(key[1])
        for digest in [d for d, w in self.origin_readers.items() if w == worker]:
            del self.origin_readers[digest]
            touched.add(digest)
        for waiting in self.waiting.values():
            waiting[:] = [r for r in waiting if r.worker != worker]
        self.uploads.pop(worker, None)
        self.retired.discard(worker)
        self.keys.pop(worker, None)
        return self._wake(sorted(touched))

    def _release(self, worker: bytes, digest: str) -> None:
        """The downloader is done with the holders it was given (finished, failed, or asking again)."""
        for holder in self.assigned.pop((worker, digest), []):
            if self.uploads[holder] > 0:
                self.uploads[holder] -= 1
        self._wake_later.add(digest)

    def _wake(self, digests: list[str]) -> list[Answer]:
        answers: list[Answer] = []
        for digest in {*digests, *self._wake_later}:
            still: list[_Request] = []
            for request in self.waiting.get(digest, []):
                answer = self._answer(request, digest)
                if answer is None:
                    still.append(request)
                else:
                    answers.append((request.worker, answer))
            if still:
                self.waiting[digest] = still
            else:
                self.waiting.pop(digest, None)
        self._wake_later.clear()
        return answers

    def wake(self) -> list[Answer]:
        """Answer the waiters that can be answered now (after slots were released)."""
        return self._wake([])
