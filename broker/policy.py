"""Which context a worker with spare credit should serve next: the affinity policy, as pure functions.

Loading a model costs minutes on a real cluster and a batch costs milliseconds, so the policy's first
rule is never to make a worker load what it need not:

1. Affinity. A worker that holds a context with queued batches gets one of those (the held context with
   the most queued work first).
2. Placement. A worker that holds nothing is told to load the context with the most queued work per host
   (``pending / (hosts + 1)``), fewest hosts breaking ties: work spreads to where it is most starved.
3. Rebalancing. A worker whose own contexts have run dry moves to another context only when that pays:
   the context has no host at all (nobody else will ever serve it), or it is starving (a backlog of at
   least ``rebalance_backlog`` batches per host) and none of its hosts is free to take more right now.
   Otherwise it stays warm, idle but ready, because its context may get more work and a reload costs
   more than a short wait.

A worker drops a context from its device only when the broker tells it to (``LoadContext.evict``, the
least recently loaded first) or when it must load another beyond its ``max_contexts``. docs/contexts.md
gives the reasoning with numbers.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Choice:
    """Serve ``context_id``; ``load`` is True when the worker must load it first."""

    context_id: str
    load: bool


def _starvation(context_id: str, pending: Mapping[str, int], hosts: Mapping[str, int]) -> tuple[float, int]:
    n_hosts = hosts.get(context_id, 0)
    return (pending[context_id] / (n_hosts + 1), -n_hosts)


def choose_context(
    held: Collection[str],
    pending: Mapping[str, int],
    hosts: Mapping[str, int],
    refused: Collection[str] = (),
    rebalance_backlog: int = 8,
    free_hosts: Mapping[str, int] | None = None,
) -> Choice | None:
    """The context a worker holding ``held`` should serve next, or None to leave it idle.

    ``pending`` counts queued batches per context, ``hosts`` the workers holding or loading each one,
    ``refused`` lists contexts this worker failed to load (never offered again), and ``free_hosts`` counts
    each context's hosts with credit to spare (None: assume none are free).
    """
    with_work = [c for c in held if pending.get(c, 0) > 0]
    if with_work:
        return Choice(max(with_work, key=lambda c: pending[c]), load=False)

    candidates = [c for c, n in pending.items() if n > 0 and c not in held and c not in refused]
    if not candidates:
        return None
    if held:
        free = free_hosts or {}
        candidates = [
            c for c in candidates
            if hosts.get(c, 0) == 0 or (pending[c] >= rebalance_backlog * hosts[c] and free.get(c, 0) == 0)
        ]  # fmt: skip
        if not candidates:
            return None
    return Choice(max(candidates, key=lambda c: _starvation(c, pending, hosts)), load=True)
