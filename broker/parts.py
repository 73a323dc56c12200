"""How the broker's parts fit together, over a state whose store is already open. No sockets: the outbox
sends through the ``send`` it is given, so tests build the same parts and read what would be sent."""

from __future__ import annotations

from dataclasses import dataclass

from pervade.broker.files import Files
from pervade.broker.job_reports import JobReports
from pervade.broker.liveness import Liveness
from pervade.broker.outbox import Outbox, Send
from pervade.broker.outcomes import Outcomes
from pervade.broker.producers import Producers
from pervade.broker.results import Results
from pervade.broker.router import Router
from pervade.broker.scheduler import Scheduler
from pervade.broker.sinks import Sinks
from pervade.broker.state import BrokerState
from pervade.broker.workers import Workers
from pervade.protocol import (
    AbortJob,
    BatchFailed,
    Completed,
    ContextFailed,
    ContextLoaded,
    DeclareContext,
    Disconnect,
    EndJob,
    FilesDropped,
    FilesHeld,
    FindSources,
    ProducerReady,
    Pull,
    Release,
    SinkAck,
    SinkReady,
    Submit,
    WorkerReady,
)


@dataclass(frozen=True)
class BrokerParts:
    state: BrokerState
    outbox: Outbox
    producers: Producers
    scheduler: Scheduler
    workers: Workers
    outcomes: Outcomes
    sinks: Sinks
    files: Files
    liveness: Liveness
    router: Router


def build_parts(state: BrokerState, send: Send, endpoint: str) -> BrokerParts:
    """The parts over ``state``, sending through ``send``; ``endpoint`` is what status snapshots name."""
    outbox = Outbox(state, send)
    reports = JobReports(state, outbox)
    sinks = Sinks(state, outbox, reports)
    outcomes = Outcomes(state, sinks)
    results = Results(state, outcomes)
    files = Files(state, outbox)
    producers = Producers(state, outbox, outcomes, reports)
    workers = Workers(state, outbox, outcomes, results, files)
    liveness = Liveness(state, outbox, workers, sinks)
    verbs = {
        ProducerReady: producers.on_producer_ready,
        Submit: producers.on_submit,
        DeclareContext: producers.on_declare_context,
        EndJob: producers.on_end_job,
        AbortJob: producers.on_abort_job,
        WorkerReady: workers.on_worker_ready,
        Pull: workers.on_pull,
        ContextLoaded: workers.on_context_loaded,
        ContextFailed: workers.on_context_failed,
        Completed: workers.on_completed,
        BatchFailed: workers.on_batch_failed,
        Release: workers.on_release,
        FindSources: files.on_find_sources,
        FilesHeld: files.on_files_held,
        FilesDropped: files.on_files_dropped,
        SinkReady: sinks.on_sink_ready,
        SinkAck: sinks.on_sink_ack,
        Disconnect: liveness.on_disconnect,
    }
    router = Router(state, outbox, results, verbs, endpoint)
    return BrokerParts(
        state=state, outbox=outbox, producers=producers, scheduler=Scheduler(state, outbox), workers=workers,
        outcomes=outcomes, sinks=sinks, files=files, liveness=liveness, router=router,
    )  # fmt: skip
