"""Keeping the peer lists true: peers that say they leave, fall silent or lose their key are dropped (what
they held goes back to work), every peer hears a heartbeat, and workers are told when the run is over
(``Drained``)."""

from __future__ import annotations

import structlog

from pervade.broker.outbox import Outbox
from pervade.broker.sinks import Sinks
from pervade.broker.state import BrokerState
from pervade.broker.workers import Workers
from pervade.keyring import KeyHolder
from pervade.protocol import Disconnect, Drained, Heartbeat

log = structlog.get_logger("broker")


class Liveness:
    def __init__(self, state: BrokerState, outbox: Outbox, workers: Workers, sinks: Sinks) -> None:
        self.state = state
        self.outbox = outbox
        self.workers = workers
        self.sinks = sinks
        #: When the run was first seen over (see send_drained_if_over).
        self._over_since: float | None = None

    def on_disconnect(self, identity: bytes, message: Disconnect) -> None:
        state = self.state
        if identity in state.workers:
            worker = state.workers[identity]
            # A leaving worker released what it would not finish; a worker that failed is charged.
            self.workers.drop_worker(worker, f"disconnected ({message.reason})", count_attempts=not worker.leaving)
        elif identity in state.sinks:
            self.sinks.drop_sink(state.sinks[identity], f"disconnected ({message.reason})")
        else:
            state.producers.pop(identity, None)

    def purge_dead_peers(self, now: float) -> None:
        """Peers silent for longer than the heartbeat liveness are dead: requeue what they held."""
        state = self.state
        dead_after = state.config.heartbeats.dead_after_s
        for worker in [w for w in state.workers.values() if now - w.last_seen > dead_after]:
            state.counters["workers_declared_dead"] += 1
            log.warning("worker_declared_dead", worker_id=worker.name, silent_s=round(now - worker.last_seen, 1))
            self.workers.drop_worker(worker, "died", count_attempts=True)
        for sink in [s for s in state.sinks.values() if now - s.last_seen > dead_after]:
            state.counters["sinks_declared_dead"] += 1
            self.sinks.drop_sink(sink, "missed heartbeats")
        for producer in [p for p in state.producers.values() if now - p.last_seen > dead_after]:
            del state.producers[producer.identity]

    def drop_peers_of(self, key: KeyHolder) -> int:
        """Every peer registered with ``key`` (revoked) dropped: a worker's batches requeued at once, with no
        attempt charged (the key was revoked, not the batch's fault), a sink's undelivered batches delivered
        again elsewhere. Returns how many peers went."""
        state = self.state
        reason = f"its key {key} was revoked"
        workers = [w for w in state.workers.values() if w.key is not None and w.key.public == key.public]
        for worker in workers:
            self.workers.drop_worker(worker, reason, count_attempts=False)
        sinks = [s for s in state.sinks.values() if s.key is not None and s.key.public == key.public]
        for sink in sinks:
            self.sinks.drop_sink(sink, reason)
        producers = [p for p in state.producers.values() if p.key is not None and p.key.public == key.public]
        for producer in producers:
            del state.producers[producer.identity]
        return len(workers) + len(sinks) + len(producers)

    def send_heartbeats(self) -> None:
        for peers in (self.state.workers, self.state.sinks, self.state.producers):
            for identity in peers:
                self.outbox.post(identity, Heartbeat())

    def run_is_over(self) -> bool:
        """Every job complete, nothing queued, and no connected producer still preparing a job (hashing a
        model, reading claims) that has not submitted yet."""
        jobs = self.state.jobs
        if not jobs or self.state.queued_total() or any(not job.done_reported for job in jobs.values()):
            return False
        finished = set().union(*(job.producers for job in jobs.values()))
        return all(identity in finished for identity in self.state.producers)

    def send_drained_if_over(self, now: float) -> None:
        """Tell the workers once the run has been over for ``drain_grace_s``, so batch jobs end instead of
        holding GPUs idle. The grace lets a script's next sweep connect without losing the workers; new
        work re-arms it. A worker joining after the run waits for work (or its idle timeout)."""
        state = self.state
        if not self.run_is_over():
            self._over_since = None
            return
        if state.drained_sent:
            return
        self._over_since = self._over_since if self._over_since is not None else now
        if now - self._over_since < state.config.drain_grace_s:
            return
        state.drained_sent = True
        drained = Drained(completed_jobs=len(state.jobs))
        for worker in state.workers.values():
            self.outbox.post(worker.identity, drained)
        log.info("drained", completed_jobs=len(state.jobs), workers=len(state.workers))

    def log_stats(self) -> None:
        state = self.state
        log.info(
            "broker_stats",
            workers=len(state.workers),
            sinks=len(state.sinks),
            producers=len(state.producers),
            queued=state.queued_total(),
            batches={status.value: n for status, n in state.store.status_counts.items() if n},
            **state.counters,
        )
