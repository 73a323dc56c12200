"""A worker's verbs about model files: where to fetch a context's files from (``FindSources``), and which
files its node cache holds or dropped. The bookkeeping is ``broker/sources.py``; this module answers."""

from __future__ import annotations

import structlog

from pervade.broker.outbox import Outbox
from pervade.broker.sources import Answer, FileSources
from pervade.broker.state import BrokerState
from pervade.protocol import FilesDropped, FilesHeld, FindSources

log = structlog.get_logger("broker")


class Files:
    def __init__(self, state: BrokerState, outbox: Outbox) -> None:
        self.state = state
        self.outbox = outbox
        config = state.config
        self.sources = FileSources(max_uploads_per_peer=config.max_uploads_per_peer, max_sources=config.max_sources)

    def on_find_sources(self, identity: bytes, message: FindSources) -> None:
        answer = self.sources.find(identity, message.files, message.exclude)
        if answer is not None:
            self.outbox.post(identity, answer)
        else:
            log.info("files_request_waiting", worker_id=self.state.workers[identity].name, files=message.files[:12])
        self.answer(self.sources.wake())

    def on_files_held(self, identity: bytes, message: FilesHeld) -> None:
        worker = self.state.workers[identity]
        counters = self.state.counters
        counters["files_fetched"] += 1
        counters["origin_bytes"] += message.origin_bytes
        counters["peer_bytes"] += message.peer_bytes
        counters["cached_bytes"] += message.cached_bytes
        log.info(
            "files_held", worker_id=worker.name, files=message.files[:12], origin_bytes=message.origin_bytes,
            peer_bytes=message.peer_bytes, cached_bytes=message.cached_bytes, seconds=round(message.seconds, 3),
        )  # fmt: skip
        self.answer(self.sources.held(identity, worker.file_endpoint, [message.files], self._public_key(identity)))

    def on_files_dropped(self, identity: bytes, message: FilesDropped) -> None:
        self.sources.dropped(identity, message.files)

    # --- what workers' comings and goings change -------------------------------------------------

    def joined(self, identity: bytes, file_endpoint: str, files: list[str]) -> None:
        """A worker registered holding ``files``: it can serve them, and waiting workers may now fetch.
        Call it once the worker's record (with its key) is in ``state.workers``."""
        self.answer(self.sources.held(identity, file_endpoint, files, self._public_key(identity)))

    def _public_key(self, identity: bytes) -> str:
        """The public key (Z85) the worker registered with: the server key its file service answers under,
        which downloaders need now that each worker node may hold a key of its own. "" without keys."""
        worker = self.state.workers.get(identity)
        return worker.key.public if worker is not None and worker.key is not None else ""

    def left(self, identity: bytes) -> None:
        """A worker is gone: who fetched from it, or waited on its origin read, is answered again."""
        self.answer(self.sources.forget(identity))

    def leaving(self, identity: bytes) -> None:
        """A worker said it is leaving: never named as a source again."""
        self.sources.retire(identity)

    def abandoned(self, identity: bytes, digest: str) -> None:
        """A worker gave up on fetching ``digest`` (its context failed to load)."""
        self.answer(self.sources.abandon(identity, digest))

    def answer(self, answers: list[Answer]) -> None:
        for identity, sources in answers:
            if identity in self.state.workers:
                self.outbox.post(identity, sources)
