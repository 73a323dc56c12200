"""The worker's intake: which queued batches are scored together, and how much credit it asks for."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import zmq.asyncio

from pervade.gpuworker.config import WorkerConfig
from pervade.gpuworker.intake import (
    MAX_PULL_CREDIT,
    MAX_WINDOW_BATCHES,
    MIN_RUN_CLAIMS,
    WINDOW_RUNS,
    CreditWindow,
    WorkQueue,
)
from pervade.gpuworker.lifecycle import Lifecycle
from pervade.gpuworker.link import BrokerLink
from pervade.gpuworker.orders import InHand
from pervade.protocol import Pull


def queue_of(*orders: tuple[str, int]) -> WorkQueue[tuple[str, int]]:
    queue: WorkQueue[tuple[str, int]] = WorkQueue(lambda order: order[1])
    for order in orders:
        queue.put(order)
    return queue


def is_a(order: tuple[str, int]) -> bool:
    return order[0] == "a"


def is_load(order: tuple[str, int]) -> bool:
    return order[0] == "load"


def test_a_run_takes_matching_orders_up_to_the_claim_limit() -> None:
    queue = queue_of(("a", 3), ("a", 3), ("a", 3), ("a", 3))
    assert queue.take_run(is_a, is_load, claims_limit=8, claims_so_far=1) == [("a", 3), ("a", 3)]
    assert queue.drain() == [("a", 3), ("a", 3)]


def test_a_run_skips_other_templates_which_keep_their_places() -> None:
    """A producer interleaves its templates: a run of template a takes every a, and the b's stay in order."""
    queue = queue_of(("a", 1), ("b", 1), ("a", 1), ("b", 2), ("a", 1))
    assert queue.take_run(is_a, is_load, claims_limit=100, claims_so_far=0) == [("a", 1), ("a", 1), ("a", 1)]
    assert queue.drain() == [("b", 1), ("b", 2)]


def test_a_run_never_passes_a_load_order() -> None:
    queue = queue_of(("b", 1), ("a", 1), ("load", 0), ("a", 1))
    assert queue.take_run(is_a, is_load, claims_limit=100, claims_so_far=0) == [("a", 1)]
    assert queue.drain() == [("b", 1), ("load", 0), ("a", 1)]


async def test_get_waits_for_an_order_and_gives_up_after_the_timeout() -> None:
    queue = queue_of()
    assert await queue.get(timeout_s=0.01) is None
    waiting = asyncio.create_task(queue.get(timeout_s=5))
    await asyncio.sleep(0)
    queue.put(("a", 1))
    assert await waiting == ("a", 1)


def test_the_window_starts_at_the_prefetch_minimum() -> None:
    window = CreditWindow(min_batches=2, run_claims=512 // WINDOW_RUNS)
    assert window.top_up(held=0) == 2
    assert window.top_up(held=0) == 0, "credit already granted is not granted twice"


def test_small_batches_widen_the_window_to_the_claims_wanted() -> None:
    window = CreditWindow(min_batches=2, run_claims=512 // WINDOW_RUNS)
    window.top_up(held=0)
    window.arrived(1)
    assert window.batches_wanted == 512
    assert window.top_up(held=1) == 512 - 1 - 1


def test_large_batches_keep_the_prefetch_minimum() -> None:
    window = CreditWindow(min_batches=2, run_claims=512 // WINDOW_RUNS)
    window.top_up(held=0)
    window.arrived(512)
    window.arrived(512)
    assert window.batches_wanted == 2
    assert window.top_up(held=1) == 1, "one batch computing: one more wanted"


def test_credit_is_asked_for_in_chunks_not_per_batch() -> None:
    window = CreditWindow(min_batches=2, run_claims=800 // WINDOW_RUNS)
    window.arrived(1)
    assert window.top_up(held=0) == 800
    for _ in range(50):  # arrived and done
        window.arrived(1)
    assert window.top_up(held=0) == 0, "50 short of 800 is under an eighth"
    for _ in range(60):
        window.arrived(1)
    assert window.top_up(held=0) == 110


def test_the_window_and_each_pull_are_bounded() -> None:
    window = CreditWindow(min_batches=2, run_claims=10**6)
    window.arrived(1)
    assert window.batches_wanted == MAX_WINDOW_BATCHES
    assert window.top_up(held=0) == MAX_PULL_CREDIT


def test_a_reconnection_forgets_the_credit_granted() -> None:
    window = CreditWindow(min_batches=2)
    window.top_up(held=0)
    window.reset()
    assert window.top_up(held=0) == 2


def test_a_run_s_answers_carry_the_credit_it_freed() -> None:
    """The Pull the compute loop sends with a run's answers (``BrokerLink.pull_due``) counts the answered
    orders as no longer held, so it asks for their places at once: a broker reads one message from each
    connection in turn, and a Pull sent after the answers waited behind every other worker's answers. A
    worker that is leaving asks for nothing."""
    config = WorkerConfig(broker="tcp://127.0.0.1:1")
    lifecycle, in_hand = Lifecycle(config), InHand()
    ctx = zmq.asyncio.Context()  # the link's session is never opened: no socket, no broker
    link = BrokerLink(ctx, config, lifecycle, in_hand, describe=None, tokenize_ahead=print)  # type: ignore[arg-type]
    for _ in range(8):
        link.window.arrived(1)  # eight batches of one claim: a window of two runs of 256 claims
    in_hand.orders = [SimpleNamespace(batches=1)] * 8  # the run being answered (pull_due counts their batches)
    assert link.pull_with_answers(answered=8) is None  # not registered (reconnecting): the new connection asks
    assert link.pull_due(answered=8) == Pull(credit=2 * MIN_RUN_CLAIMS)
    assert link.pull_due() is None  # asked for already: the window is full again
    link.window.reset()
    lifecycle.stop("test")
    assert link.pull_due(answered=8) is None
    ctx.term()


def test_a_slice_uses_a_credit_for_each_batch_it_holds() -> None:
    """The broker charges a slice a credit per producer batch in it (``Scheduler.assign``), and the window
    counts the same, so what it asks for stays in the producer's batches whatever the slicing."""
    window = CreditWindow(min_batches=2)
    assert window.top_up(held=0) == 2
    window.arrived(claims=6, batches=3)  # a slice of three 2-claim batches, charged the two credits granted
    assert window.outstanding == 0 and window.claims_per_batch == 2.0
    assert window.batches_wanted == WINDOW_RUNS * MIN_RUN_CLAIMS // 2
    window.arrived(claims=4, batches=1)
    assert window.claims_per_batch == 3.0  # one 4-claim batch after the slice's 2-claim ones
