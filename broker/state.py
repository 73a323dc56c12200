"""What the broker's verbs work on: the durable store (already open), the live peers, the jobs, the
contexts and manifests producers declared, and the counters.

Batches and jobs are durable (``broker/store.py``); peers are not: after a broker restart every peer
registers again. One ``BrokerState`` is shared by the verb modules (producers, workers, sinks, files), the
scheduler and the outcomes; it holds no sockets, so the verbs can be tested without any.
"""

from __future__ import annotations

import time
from collections import Counter

from pervade.broker.config import BrokerConfig
from pervade.broker.constants import COUNTERS
from pervade.broker.records import PeerRecord, ProducerRecord, SinkRecord, WorkerRecord
from pervade.broker.status import build_progress, build_snapshot
from pervade.broker.store import BrokerStore, JobRecord
from pervade.context import ContextSpec
from pervade.keyring import KeyHolder
from pervade.manifest import Manifest
from pervade.protocol import RunProgress, StatusSnapshot
from pervade.rates import RateMeter


class BrokerState:
    """The broker's state over an open store (what a previous broker left is already recovered into it)."""

    def __init__(self, config: BrokerConfig, store: BrokerStore) -> None:
        self.config = config
        self.store = store
        self.workers: dict[bytes, WorkerRecord] = {}
        self.sinks: dict[bytes, SinkRecord] = {}
        self.producers: dict[bytes, ProducerRecord] = {}
        self.jobs: dict[str, JobRecord] = store.jobs()
        self.specs: dict[str, ContextSpec] = store.contexts()
        #: Manifests declared by producers, by digest.
        self.manifests: dict[str, Manifest] = store.manifests()
        #: Contexts no live worker could load, with the error; cleared when a new worker joins.
        self.failed_contexts: dict[str, str] = {}
        #: Workers that died loading a context since a batch of it last completed.
        self.load_deaths: dict[str, int] = {}
        self.counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self.counters.update(store.meta("counters", {}))  # type: ignore[arg-type]
        if store.damage is not None:
            self.counters["state_damage_detected"] += 1
        #: Claims completed per second, over the last half minute (pervade status, metrics).
        self.throughput = RateMeter()
        self.started_at = time.time()
        #: Whether workers were told the run is over (``Drained``); new work re-arms it (see liveness.py).
        self.drained_sent = False
        #: The key that sent the message being handled (set by the router around each verb): what a
        #: registration records and a result is stamped with. None on a broker without keys.
        self.sender: KeyHolder | None = None
        #: The worker keys admitted (public, Z85), as last read: what workers' file services are told to
        #: admit (``PeerKeys``). None on a broker without keys.
        self.worker_keys: frozenset[str] | None = None
        #: On a broker with keys, the worker keys (public) each open batch was assigned to: only they may
        #: answer it (a late answer from an earlier assignee included). In memory: after a restart every
        #: assigned batch is requeued, and assigned again.
        self.given_to: dict[str, set[str]] = {}
        #: Likewise, the sink keys each outcome not yet written was delivered to: only they may acknowledge it
        #: written (another sink key's ack would end a job whose rows nobody wrote).
        self.delivered_to: dict[str, set[str]] = {}
        #: Batches also assigned to an idle worker while another still held them (``Scheduler.speculate``),
        #: with the workers that held them before, the original first: the batch's row names the holder of the
        #: latest copy. Once any of them answers, the others' answers are no longer waited for. In memory:
        #: after a restart every assigned batch is requeued anyway.
        self.speculated: dict[str, list[bytes]] = {}
        #: Workers that may have run out of work since the last dispatch (their last batch answered, credit or a
        #: context gained): the only ones ``Scheduler.speculate`` looks at, so a turn costs nothing per worker.
        self.maybe_idle: set[bytes] = set()
        #: Idle workers ``Scheduler.speculate`` found nothing to copy for: looked at again once it next makes a
        #: copy (one given to a slow worker may be worth copying again to a fast one).
        self.passed_over: set[bytes] = set()
        #: Contexts a producer declared since the last dispatch, whose batches are on their way: workers holding
        #: no context start loading them then (``Scheduler.prewarm``).
        self.declared: set[str] = set()

    def take_off_window(self, worker: WorkerRecord, batch_id: str) -> None:
        """``worker`` will not answer ``batch_id`` (it did, failed it, or another's answer came first): off its
        window, and once the window is empty it may copy others' work (``maybe_idle``)."""
        worker.in_flight.pop(batch_id, None)
        if not worker.in_flight:
            self.maybe_idle.add(worker.identity)

    def peer(self, identity: bytes) -> PeerRecord | None:
        return self.workers.get(identity) or self.sinks.get(identity) or self.producers.get(identity)

    def job(self, job_id: str, producer: bytes) -> JobRecord:
        """The job (a new one if unknown), with ``producer`` among those waiting for it."""
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = JobRecord(job_id=job_id)
        # Every producer of the job hears JobDone: the same sweep run twice at once is one job (its id names
        # its content), and each of its producers waits for it.
        job.producers.add(producer)
        return job

    def queued_total(self) -> int:
        return sum(self.store.queued.values())

    def progress(self) -> RunProgress:
        """The jobs' progress alone, for a sink's bar (broker/status.py)."""
        return build_progress(list(self.jobs.values()), self.throughput.rate())

    def snapshot(self, endpoint: str) -> StatusSnapshot:
        """The run as ``pervade status`` shows it (broker/status.py)."""
        return build_snapshot(
            endpoint=endpoint,
            started_at=self.started_at,
            workers=list(self.workers.values()),
            specs=self.specs,
            queued=self.store.queued,
            jobs=list(self.jobs.values()),
            claims_per_s=self.throughput.rate(),
            batches={status.value: n for status, n in self.store.status_counts.items()},
            counters=self.counters,
            sinks=len(self.sinks),
            producers=len(self.producers),
        )
