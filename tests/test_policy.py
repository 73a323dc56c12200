"""The affinity policy: keep workers on what they hold, place newcomers where work starves."""

from __future__ import annotations

from pervade.broker.policy import Choice, choose_context


def test_held_context_with_work_wins_even_if_others_have_more() -> None:
    assert choose_context(held=["a"], pending={"a": 1, "b": 100}, hosts={"a": 1}) == Choice("a", load=False)


def test_among_held_contexts_the_fuller_queue_first() -> None:
    assert choose_context(held=["a", "b"], pending={"a": 2, "b": 5}, hosts={"a": 1, "b": 1}) == Choice("b", False)


def test_empty_worker_loads_the_context_with_most_pending_work() -> None:
    assert choose_context(held=[], pending={"a": 3, "b": 9}, hosts={}) == Choice("b", load=True)


def test_empty_worker_prefers_fewest_hosts_per_pending_batch() -> None:
    # b has more work, but three hosts already; a has none
    assert choose_context(held=[], pending={"a": 6, "b": 9}, hosts={"b": 3}) == Choice("a", load=True)
    # equal work per host: the context with fewer hosts
    assert choose_context(held=[], pending={"a": 4, "b": 8}, hosts={"b": 1}) == Choice("a", load=True)


def test_nothing_queued_means_no_choice() -> None:
    assert choose_context(held=[], pending={}, hosts={}) is None
    assert choose_context(held=["a"], pending={"a": 0}, hosts={"a": 1}) is None


def test_idle_worker_stays_warm_unless_moving_pays() -> None:
    # b has a host with a short backlog: a's worker stays on a
    assert choose_context(held=["a"], pending={"b": 3}, hosts={"a": 1, "b": 1}, rebalance_backlog=8) is None
    # b's backlog per host reached the threshold: move
    assert choose_context(held=["a"], pending={"b": 16}, hosts={"a": 1, "b": 2}, rebalance_backlog=8) == Choice("b", True)
    # b has no host at all: someone must load it
    assert choose_context(held=["a"], pending={"b": 1}, hosts={"a": 1}) == Choice("b", True)


def test_no_move_to_a_starving_context_while_one_of_its_hosts_is_free() -> None:
    starving = {"held": ["a"], "pending": {"b": 16}, "hosts": {"a": 1, "b": 2}, "rebalance_backlog": 8}
    assert choose_context(**starving, free_hosts={"b": 1}) is None  # b's own host will take it
    assert choose_context(**starving, free_hosts={"a": 1}) == Choice("b", True)


def test_refused_contexts_are_never_offered_again() -> None:
    assert choose_context(held=[], pending={"a": 5}, hosts={}, refused={"a"}) is None
    assert choose_context(held=[], pending={"a": 5, "b": 1}, hosts={}, refused={"a"}) == Choice("b", True)
