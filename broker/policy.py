"""Which context a worker with spare credit should serve next: the affinity policy, as pure functions.

Loading a model costs minutes on a real cluster and a batch costs milliseconds, so the policy's first
rule is never to make a worker load what it need not:

1. Affinity. A worker that holds a context with queued batches gets one of those (the held context with
   the most queued work first).
2. Placement. A worker that holds nothing is told to load the context with the most queued work per host
   (``pending / (hosts + 1)``), fewest hosts breaking ties: work spreads to where it is most starved.
3. Rebalancing. A worker whose own contexts have run dry moves to another context only when that pays:
   the context has no host at all (nobody else will ever serve it) or a backlog of at least
   ``rebalance_backlog`` batches per host (its hosts will not drain it soon). Otherwise it stays warm,
   idle but ready, because its context may get more work and a reload costs more than a short wait.
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
) -> Choice | None:
    """The context a worker holding ``held`` should serve next, or None to leave it idle.

    ``pending`` counts queued batches per context, ``hosts`` the workers holding or loading each one,
    and ``refused`` lists contexts this worker failed to load (never offered again).
    """
    with_work = [c for c in held if pending.get(c, 0) > 0]
    if with_work:
        return Choice(max(with_work, key=lambda c: pending[c]), load=False)

    candidates = [c for c, n in pending.items() if n > 0 and c not in held and c not in refused]
    if not candidates:
        return None
    if held:
        candidates = [
            c for c in candidates if hosts.get(c, 0) == 0 or pending[c] >= rebalance_backlog * hosts[c]
        ]
        if not candidates:
            return None
    return Choice(max(candidates, key=lambda c: _starvation(c, pending, hosts)), load=True)
