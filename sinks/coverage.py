"""Which claims of a delivered batch the output holds already, when the batch may be there in parts.

A batch a worker could not score is split into parts named ``ROOT~START-STOP`` (poison isolation,
``broker/outcomes.py``), each delivered and written under its own id. A broker that lost its state gets the
batch resubmitted whole, and may score it whole where the broker before it split it, or split it where that
one did not (the failure was a worker's, an out-of-memory, not a claim's). So an id alone does not say
whether a delivery's rows are written: the sink asks which of the root's claims the ids it knows cover, and
writes only the others (``claims_left``). A batch id in the output therefore means all its claims are there,
under it or under its root's other ids.
"""

from __future__ import annotations

from collections.abc import Container, Iterable

from pervade.protocol import PART_MARK, PartOf, part_id, part_of

#: Claims [start, stop) of a root batch, as offsets in it.
Span = tuple[int, int]
_NONE: set[Span] = set()  # never changed: what ``of`` gives for a root without parts


class PartsByRoot:
    """The parts among a set of batch ids, by their root: what a lookup of the root's claims needs."""

    def __init__(self) -> None:
        self._spans: dict[str, set[Span]] = {}

    def note(self, batch_ids: Iterable[str]) -> None:
        for batch_id in batch_ids:  # a foreign file's column may hold anything: nulls, numbers
            if isinstance(batch_id, str) and PART_MARK in batch_id and (part := part_of(batch_id)) is not None:
                self._spans.setdefault(part.root, set()).add((part.start, part.stop))

    def of(self, root: str) -> set[Span]:
        return self._spans.get(root, _NONE)

    def __contains__(self, root: str) -> bool:
        """Whether a part of ``root`` is among the ids."""
        return root in self._spans

    def clear(self) -> None:
        self._spans.clear()


def extent(batch_id: str, claims: int) -> PartOf:
    """The root, and the root's claims, that a delivery of ``claims`` rows under ``batch_id`` holds."""
    part = part_of(batch_id) if PART_MARK in batch_id else None
    if part is not None and part.stop - part.start == claims:
        return part
    return PartOf(batch_id, 0, claims)


def claims_left(batch_id: str, claims: int, holders: Iterable[tuple[Container[str], PartsByRoot]]) -> list[Span]:
    """The claims of a delivery (``claims`` rows under ``batch_id``; offsets in its root) that none of
    ``holders`` (ids, and their parts by root) holds, in order; [] when every one is held."""
    root, start, stop = extent(batch_id, claims)
    covered: list[Span] = []
    for ids, parts in holders:
        if batch_id in ids or (root != batch_id and root in ids):
            return []
        covered.extend(parts.of(root))
    left, at = [], start
    for first, end in sorted(covered):
        if end <= at or first >= stop:
            continue
        if first > at:
            left.append((at, first))
        at = max(at, end)
        if at >= stop:
            break
    if at < stop:
        left.append((at, stop))
    return left


def rows_in(spans: list[Span], start: int) -> list[int]:
    """The row positions of a delivery whose first row is claim ``start`` of its root, for claims ``spans``."""
    return [offset - start for first, end in spans for offset in range(first, end)]


def covering_ids(batch_id: str, ids: Container[str], parts: PartsByRoot) -> list[str] | None:
    """The ids among ``ids`` that may hold some of the claims of ``batch_id`` (other parts of its root): what
    a sink publishing ``batch_id`` must not write again. None when one of them holds all its claims (the id
    itself, or its root written whole); [] when none holds any."""
    part = part_of(batch_id) if PART_MARK in batch_id else None
    root = batch_id if part is None else part.root
    if batch_id in ids or (part is not None and root in ids):
        return None
    return [
        part_id(root, first, end)
        for first, end in sorted(parts.of(root))
        if part is None or (first < part.stop and end > part.start and (first, end) != (part.start, part.stop))
    ]
