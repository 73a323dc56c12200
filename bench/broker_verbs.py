"""The broker's own CPU per batch, every verb of a batch's life, without sockets or other processes.

    .venv/bin/python bench/broker_verbs.py                               # 30,000 batches of 1 claim, 100 workers
    .venv/bin/python bench/broker_verbs.py --claims 1 32 --batches 20000 --repeats 5

``bench/broker_capacity.py`` measures the whole system on this machine's 2 cores, where the broker shares
them with a sink, a producer and simulated workers, and its figures spread by a quarter from run to run.
This script measures what only the broker spends, in one process, so that a change to the broker shows
even when it is a few percent:

- the broker's parts (``broker/parts.py``: router, scheduler, outbox) over a real store (SQLite, in a
  temporary directory), as ``tests/test_broker_verbs.py`` builds them; the outbox's send hands each group's
  frames to the simulated peer instead of a socket;
- ``--workers`` workers holding the context, each granting ``--credit`` batches; one sink; one producer;
- the producer submits ``--per-turn`` batches as one group a turn, while fewer than ``--backlog`` are queued
  (by default twice what the workers ask for at once: a producer ahead of its workers; a queue that runs dry
  has idle workers copy busy ones' batches, a tail's behaviour, not a batch's cost); each worker answers
  what it was assigned in one group (``completed`` for each, with a fixed verdict per claim, and a ``pull``
  for the credit they used), and the sink acknowledges what it was delivered in one ``sink_ack``, as the
  real peers do;
- a turn is what the broker's loop does: the messages handled, one dispatch, one commit, the sends;
- the broker logs as deployed (``--log-level``, JSON lines), into a file in the temporary directory, and
  its garbage collector is set as deployed (``pervade/collector.py``'s ``collect_garbage_rarely``).

Only the broker's calls are timed (``time.process_time``: CPU, not wall; the peers' encoding and decoding
is not counted): ``handle`` of each verb's messages, ``dispatch``, and ``flush`` (commit and send). The
columns are microseconds per batch, and ``claims_per_s_one_core`` what one free core would route at that
cost. Each row is the fastest of ``--repeats`` runs (the least disturbed by anything else on the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from benchkit import DEFAULT_OUT_DIR, Report, stacked_bars
from store_lifecycle import make_batches, result_of

from pervade.broker.config import BrokerConfig
from pervade.broker.parts import BrokerParts, build_parts
from pervade.broker.state import BrokerState
from pervade.broker.store import BatchStatus, BrokerStore
from pervade.collector import collect_garbage_rarely
from pervade.context import ContextSpec
from pervade.logs import configure_logging
from pervade.protocol import (
    Assign,
    Batch,
    Completed,
    Deliver,
    DeviceInfo,
    Message,
    ProducerReady,
    Pull,
    SinkAck,
    SinkReady,
    Submit,
    WorkerReady,
    bodies,
    decode_body,
    encode_group,
)

PHASES = ("submit", "complete", "ack", "dispatch", "flush")


class Peers:
    """What the broker sends, per peer: the outbox's send keeps the frames (as a socket would take them), and
    ``take`` decodes them as the peers would, outside the broker's time."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, list[bytes]]] = []

    def send(self, identity: bytes, frames: list[bytes]) -> bool:
        self.sent.append((identity, frames))
        return True

    def take(self) -> dict[bytes, list[Message]]:
        inbox: dict[bytes, list[Message]] = defaultdict(list)
        for identity, frames in self.sent:
            inbox[identity].extend(decode_body(body) for body in bodies(frames))
        self.sent = []
        return inbox


def run(
    batches: list[Batch], workers: int, credit: int, per_turn: int, backlog: int, directory: Path
) -> dict[str, float]:
    """CPU microseconds per batch the broker spends in each phase, over every batch's whole life (its log
    lines go to ``directory``/broker.log)."""
    directory.mkdir(parents=True)
    with open(directory / "broker.log", "w") as log_file, contextlib.redirect_stderr(log_file):
        with garbage_collected_as_deployed():
            return _run(batches, workers, credit, per_turn, backlog, directory)


@contextlib.contextmanager
def garbage_collected_as_deployed() -> Iterator[None]:
    """The collector set as ``run_broker`` sets it (``collect_garbage_rarely``), and restored after: at the
    default threshold, this process's own objects (the batches, the peers' messages) made the broker's calls
    pay for collections the deployed broker does not make."""
    saved = gc.get_threshold()
    collect_garbage_rarely()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


def _run(
    batches: list[Batch], workers: int, credit: int, per_turn: int, backlog: int, directory: Path
) -> dict[str, float]:
    store = BrokerStore.open(directory)
    state = BrokerState(BrokerConfig(bind="tcp://127.0.0.1:*", state_dir=directory), store)
    peers = Peers()
    parts: BrokerParts = build_parts(state, peers.send, endpoint="tcp://127.0.0.1:0")
    spent: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    def deliver(identity: bytes, messages: list[Message], phase: str) -> None:
        frames_list = encode_group(messages)  # the peer's encoding: not the broker's time
        started = time.process_time()
        for frames in frames_list:
            parts.router.handle([identity, *frames])
        spent[phase] += time.process_time() - started

    def turn() -> dict[bytes, list[Message]]:
        started = time.process_time()
        parts.scheduler.dispatch()
        middle = time.process_time()
        parts.outbox.flush()
        spent["dispatch"] += middle - started
        spent["flush"] += time.process_time() - middle
        return peers.take()

    context_id = batches[0].context.context_id
    worker_ids = [f"w{n}".encode() for n in range(workers)]
    device = DeviceInfo(kind="cpu", name="cpu")
    for identity in worker_ids:
        ready = WorkerReady(worker_id=identity.decode(), host="h", pid=1, device=device, contexts=[context_id])
        deliver(identity, [ready, Pull(credit=credit)], "complete")
    deliver(b"sink", [SinkReady(sink_id="sink")], "ack")
    deliver(b"producer", [ProducerReady(producer_id="producer")], "submit")
    inbox = turn()
    for phase in PHASES:  # set-up is not a batch's cost
        spent[phase] = 0.0
    written = submitted = 0
    while written < len(batches):
        group = batches[submitted : submitted + per_turn] if sum(store.queued.values()) < backlog else []
        if group:
            deliver(b"producer", [Submit(batch=b) for b in group], "submit")
            submitted += len(group)
        for identity, messages in inbox.items():
            if identity == b"sink":
                ids = [m.result.batch_id for m in messages if isinstance(m, Deliver)]
                if ids:
                    deliver(identity, [SinkAck(batch_ids=ids)], "ack")
                    written += len(ids)
            elif identity != b"producer":
                assigned = [m.batch for m in messages if isinstance(m, Assign)]
                if assigned:
                    worker_id = identity.decode()
                    answers: list[Message] = [Completed(result=result_of(b, context_id, worker_id)) for b in assigned]
                    deliver(identity, [*answers, Pull(credit=len(assigned))], "complete")
        inbox = turn()
        if not inbox and not group and written < len(batches):  # nothing sent, nothing to answer: stuck
            raise SystemExit(f"the broker stalled with {written:,} of {len(batches):,} batches written")
    if store.status_counts[BatchStatus.WRITTEN] != len(batches):
        raise SystemExit(f"{store.status_counts[BatchStatus.WRITTEN]:,} batches written, not {len(batches):,}")
    store.close()
    figures = {f"{phase}_us": spent[phase] / len(batches) * 1e6 for phase in PHASES}
    figures["total_us"] = sum(figures.values())
    return figures


def fastest(runs: list[dict[str, float]]) -> dict[str, float]:
    return min(runs, key=lambda figures: figures["total_us"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=30_000, help="batches through the broker (default: 30,000)")
    parser.add_argument(
        "--claims", type=int, nargs="+", default=[1, 32], help="claims per batch, a row each (default: 1 32)"
    )
    parser.add_argument("--workers", type=int, default=100, help="workers holding the context (default: 100)")
    parser.add_argument("--credit", type=int, default=8, help="batches each worker asks for at once (default: 8)")
    parser.add_argument("--per-turn", type=int, default=256, help="batches the producer submits a turn (default: 256)")
    parser.add_argument("--backlog", type=int, default=None,
                        help="queued batches the producer keeps ahead (default: twice workers x credit)")  # fmt: skip
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="the broker's log level (default: info, as deployed)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="runs of each row; the fastest is shown (default: 3)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="CSV and PNG (default: bench/results)")
    args = parser.parse_args()
    if args.backlog is None:
        args.backlog = 2 * args.workers * args.credit
    if min(args.batches, args.workers, args.credit, args.per_turn, args.backlog, args.repeats, *args.claims) < 1:
        parser.error("every count must be at least 1")
    configure_logging(args.log_level, json=True)
    if args.credit > 1024:
        parser.error("--credit: a worker asks for at most 1,024 batches at once (the protocol's limit)")
    columns = ["batches", "claims", "workers", *(f"{p}_us" for p in PHASES), "total_us", "claims_per_s_one_core"]
    report = Report("broker_verbs", columns=columns, out_dir=args.out_dir)
    report.header(
        "the broker's own CPU per batch, no sockets (us per batch by phase, fastest of "
        f"{args.repeats}); {args.per_turn} batches submitted a turn up to {args.backlog:,} queued, workers granting "
        f"{args.credit} each"
    )
    for claims in args.claims:
        batches = make_batches(args.batches, claims, ContextSpec(model="bench/model"))
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="pervade-verbs-") as directory:
                state_dir = Path(directory) / "state"
                runs.append(run(batches, args.workers, args.credit, args.per_turn, args.backlog, state_dir))
        best = fastest(runs)
        report.add(batches=args.batches, claims=claims, workers=args.workers, **best,
                   claims_per_s_one_core=round(claims * 1e6 / best["total_us"]))  # fmt: skip

    draw = stacked_bars("claims", PHASES, "claims per batch", "broker CPU, us per batch")
    report.finish(draw, title=f"broker verbs, {args.batches:,} batches, {args.workers} workers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
