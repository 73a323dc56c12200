"""The store keeps a turn's changes, the batches in flight and the front of each queue in memory: what it
answers must be what its database holds once committed, and its queues must keep their order through
read-ahead, requeues, splits and batches leaving from the middle."""

from __future__ import annotations

import random
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from msgspec.structs import replace

from pervade.broker import store as store_module
from pervade.broker.seen import SeenIds
from pervade.broker.store import STORE_FILE, BatchStatus, BrokerStore
from pervade.errors import StateError
from pervade.protocol import Batch
from tests.test_broker import batch, result_for

CONTEXT = batch("j", 0).context.context_id
COLUMNS = (
    "batch_id, status, attempts, deliveries, worker, sink, error,"
    " EXISTS (SELECT 1 FROM payloads WHERE payloads.seq = batches.seq), result IS NOT NULL"
)


def database_rows(path: Path) -> dict[str, tuple]:
    """Every batch's bookkeeping as committed, read on a connection of its own."""
    with closing(sqlite3.connect(path)) as db:  # closed: a reader left open would hold the log at the store's close
        return {row[0]: row[1:] for row in db.execute(f"SELECT {COLUMNS} FROM batches")}


def database_queue(path: Path) -> list[str]:
    with closing(sqlite3.connect(path)) as db:
        query = "SELECT batch_id FROM batches WHERE status = 'queued' ORDER BY queue_key"
        return [row[0] for row in db.execute(query)]


def as_columns(store: BrokerStore, batch_id: str) -> tuple:
    """A row as the database must hold it: an assignment is never written, so an assigned batch is held as
    queued, with the attempts before the one in hand."""
    row = store.get(batch_id)
    assert row is not None
    holds_claims = row.status not in (BatchStatus.WRITTEN, BatchStatus.SPLIT)  # a written batch drops them
    holds_verdicts = row.status in (BatchStatus.DONE, BatchStatus.DELIVERED) and row.error is None
    if row.status is BatchStatus.ASSIGNED:
        return "queued", max(row.attempts - 1, 0), row.deliveries, None, row.sink, row.error, True, False
    return row.status.value, row.attempts, row.deliveries, row.worker, row.sink, row.error, holds_claims, holds_verdicts


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rows_in_memory_match_the_database_through_a_random_run(tmp_path, monkeypatch, seed) -> None:
    monkeypatch.setattr(store_module, "QUEUE_READ_AHEAD", 4)  # refills and a head that is not the whole queue
    rng = random.Random(seed)
    store = BrokerStore.open(tmp_path / "state")
    path = tmp_path / "state" / STORE_FILE
    queue: list[str] = []  # the queue's order as the store must keep it: the test's own model
    batches: dict[str, Batch] = {}
    assigned: list[str] = []
    done: list[str] = []
    delivered: list[str] = []
    for step in range(600):
        action = rng.choice(["add", "add", "assign", "assign", "requeue", "complete", "deliver", "ack", "abort"])
        if action == "add":
            new = batch("j", len(batches))
            batches[new.batch_id] = new
            store.add(new)
            queue.append(new.batch_id)
        elif action == "assign" and queue:
            front = store.next_queued_batch(CONTEXT)
            assert front is not None and front[0].batch_id == queue[0], f"step {step}: the queue's order"
            assert front[1] == batches[queue[0]]
            store.assign(front[0], b"w")
            assigned.append(queue.pop(0))
        elif action == "requeue" and assigned:
            batch_id = assigned.pop(rng.randrange(len(assigned)))
            store.requeue(store.get(batch_id), count_attempt=rng.random() < 0.5)
            queue.insert(0, batch_id)
        elif action == "complete" and assigned:
            batch_id = assigned.pop(rng.randrange(len(assigned)))
            store.complete(store.get(batch_id), result_for(batches[batch_id]))
            done.append(batch_id)
        elif action == "deliver" and done:
            batch_id = done.pop(0)
            store.deliver(store.get(batch_id), b"sink")
            delivered.append(batch_id)
        elif action == "ack" and delivered:
            store.written(store.get(delivered.pop(0)))
        elif action == "abort" and len(queue) > 2:  # a batch leaves from the middle of its queue
            batch_id = queue.pop(rng.randrange(1, len(queue)))
            store.fail(store.get(batch_id), "aborted")
        assert store.queued.get(CONTEXT, 0) == len(queue)
        if rng.random() < 0.2:
            store.commit()
            committed = database_rows(path)
            assert committed == {batch_id: as_columns(store, batch_id) for batch_id in batches}, f"step {step}"
            assert [i for i in database_queue(path) if i not in assigned] == queue
            assert store.queued_ids(CONTEXT) == queue
    store.commit()
    counts = dict(store.status_counts)
    store.close()
    reopened = BrokerStore.open(tmp_path / "state")
    assert reopened.recover() == (0, len(delivered))
    counts[BatchStatus.QUEUED] += counts.pop(BatchStatus.ASSIGNED, 0)  # assignments die with the broker
    counts[BatchStatus.DONE] += counts.pop(BatchStatus.DELIVERED, 0)  # and deliveries not acknowledged
    assert {status: n for status, n in reopened.status_counts.items() if n} == {s: n for s, n in counts.items() if n}
    requeued = set(assigned)
    assert sorted(reopened.queued_ids(CONTEXT)) == sorted(queue + assigned)
    assert [i for i in reopened.queued_ids(CONTEXT) if i not in requeued] == queue
    assert [i for i in database_queue(path) if i in requeued] == [i for i in reopened.queued_ids(CONTEXT) if i in requeued]
    expected, order = reopened.queued_ids(CONTEXT), []
    while (front := reopened.next_queued_batch(CONTEXT)) is not None:  # read ahead, skipping what is in flight
        order.append(front[0].batch_id)
        reopened.assign(front[0], b"w2")
        if len(order) % 3 == 0:
            reopened.commit()
    assert order == expected and reopened.queued_ids(CONTEXT) == [] and not reopened.queued
    reopened.close()


def test_a_split_queues_its_parts_at_the_front_in_order(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(store_module, "QUEUE_READ_AHEAD", 2)
    store = BrokerStore.open(tmp_path / "state")
    first, *rest = [batch("j", n, claims=4) for n in range(4)]
    for each in (first, *rest):
        store.add(each)
    row, held = store.next_queued_batch(CONTEXT)
    store.assign(row, b"w")
    parts = [replace(held, batch_id=f"{held.batch_id}~{i}", claims=held.claims[i * 2 : i * 2 + 2]) for i in range(2)]
    store.split(store.get(row.batch_id), parts)
    order = []
    while (front := store.next_queued(CONTEXT)) is not None:
        order.append(front.batch_id)
        store.assign(front, b"w")
    assert order == [parts[0].batch_id, parts[1].batch_id, *(b.batch_id for b in rest)]
    assert store.get(first.batch_id).status is BatchStatus.SPLIT
    store.commit()
    assert database_rows(tmp_path / "state" / STORE_FILE)[first.batch_id][0] == "split"
    store.close()


def test_a_split_whose_part_id_a_producer_took_is_refused_before_any_change(tmp_path) -> None:
    """Ids may hold ``~``: a producer's batch named like a part. The split is refused at once (the broker then
    retries the batch whole), not at the commit, where the failed insert would fail the whole turn."""
    store = BrokerStore.open(tmp_path / "state")
    whole = batch("j", 0, claims=4)
    squatter = replace(batch("j", 1), batch_id="j/0~0-2")
    store.add(whole)
    store.add(squatter)
    store.commit()
    row, held = store.next_queued_batch(CONTEXT)
    store.assign(row, b"w")
    parts = [
        replace(held, batch_id=f"j/0~{i * 2}-{i * 2 + 2}", claims=held.claims[i * 2 : i * 2 + 2]) for i in range(2)
    ]
    with pytest.raises(StateError, match="already holds j/0~0-2"):
        store.split(store.get(whole.batch_id), parts)
    assert store.get(whole.batch_id).status is BatchStatus.ASSIGNED
    assert store.get(squatter.batch_id).root is None and store.queued[CONTEXT] == 1
    store.commit()  # nothing half-done is left to fail it
    store.close()


def test_a_turn_writes_each_changed_batch_once(tmp_path) -> None:
    """A batch submitted, assigned, completed and delivered in one turn is one INSERT of its last state (and
    one of its claims, beside it); one completed and delivered in the next is one UPDATE: a row is written
    once per commit, however often it changed (each write of a row is a B-tree update and a log page)."""
    store = BrokerStore.open(tmp_path / "state")
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    new = batch("j", 0)
    store.add(new)
    row, held = store.next_queued_batch(CONTEXT)
    store.assign(row, b"w")
    done = store.complete(store.get(new.batch_id), result_for(held))
    store.deliver(done, b"sink")
    store.commit()
    writes = [s.split()[:3] for s in statements if s.split()[0] in ("INSERT", "UPDATE")]
    assert writes == [["INSERT", "INTO", "batches"], ["INSERT", "INTO", "payloads"]], statements
    assert database_rows(tmp_path / "state" / STORE_FILE)[new.batch_id] == as_columns(store, new.batch_id)
    second = batch("j", 1)
    store.add(second)
    store.commit()
    statements.clear()
    row, held = store.next_queued_batch(CONTEXT)
    store.assign(row, b"w")
    store.deliver(store.complete(store.get(second.batch_id), result_for(held)), b"sink")
    store.written(store.get(new.batch_id))
    store.commit()
    updates = [s for s in statements if s.startswith("UPDATE")]
    assert len(updates) == 2, statements  # the second batch's three changes, and the first one's write
    committed = database_rows(tmp_path / "state" / STORE_FILE)
    assert committed == {b: as_columns(store, b) for b in (new.batch_id, second.batch_id)}
    store.close()


def test_batches_written_by_runs_and_alone_are_written_whole(tmp_path) -> None:
    """Batches written with no other change go by runs of seqs (``_flush``), a batch delivered and written in
    one flush goes alone; the database must hold each whole: checked against the expected columns, not
    ``store.get`` (which reads a written batch back from that same database)."""
    store = BrokerStore.open(tmp_path / "state")
    for n in range(4):
        store.add(batch("j", n))
    store.commit()
    for _ in range(3):
        row, held = store.next_queued_batch(CONTEXT)
        store.assign(row, b"w")
        store.complete(store.get(row.batch_id), result_for(held))
    store.commit()
    store.deliver(store.get("j/0"), b"s")
    store.deliver(store.get("j/2"), b"s")
    store.commit()
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    store.written(store.get("j/0"))  # two runs of one seq each, around j/1
    store.written(store.get("j/2"))
    store.deliver(store.get("j/1"), b"s")  # delivered and written in one flush: its deliveries changed
    store.written(store.get("j/1"))
    store.commit()
    written = ("written", 1, 1, None, None, None, False, False)
    assert database_rows(tmp_path / "state" / STORE_FILE) == {
        "j/0": written, "j/1": written, "j/2": written, "j/3": ("queued", 0, 0, None, None, None, True, False),
    }  # fmt: skip
    assert sum("BETWEEN" in s and s.startswith("UPDATE") for s in statements) == 2, statements
    store.close()


def test_claims_kept_in_the_row_by_an_older_broker_move_to_their_own_table(tmp_path) -> None:
    """An older broker kept a batch's claims in its row: opened by this one, they move to ``payloads`` once,
    the batch is assigned with them, and they are dropped when it is written."""
    store = BrokerStore.open(tmp_path / "state")
    queued, written = batch("j", 0), batch("j", 1)
    store.add(queued)
    store.add(written)
    store.commit()
    store.close()
    path = tmp_path / "state" / STORE_FILE
    with closing(sqlite3.connect(path)) as db:  # the older layout: claims in the row, no payloads table
        db.execute("UPDATE batches SET payload = (SELECT payload FROM payloads WHERE payloads.seq = batches.seq)")
        db.execute("DROP TABLE payloads")
        db.execute("DELETE FROM meta WHERE key = 'payloads_apart'")
        db.commit()
    store = BrokerStore.open(tmp_path / "state")
    row, held = store.next_queued_batch(CONTEXT)
    assert held == queued
    store.assign(row, b"w")
    store.deliver(store.complete(store.get(queued.batch_id), result_for(queued)), b"sink")
    store.written(store.get(queued.batch_id))
    store.commit()
    store.close()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT count(*) FROM batches WHERE payload IS NOT NULL").fetchone() == (0,)
        moved = db.execute("SELECT batch_id FROM batches JOIN payloads USING (seq)").fetchall()
    assert moved == [(written.batch_id,)]
    reopened = BrokerStore.open(tmp_path / "state")
    assert reopened.batch(written.batch_id) == written
    reopened.close()


def test_a_new_batch_id_costs_no_query_and_a_known_one_is_found_after_a_restart(tmp_path) -> None:
    """``get`` of an id the store never held answers from its filter of seen ids, without a query (every
    submission asks); an id it holds is found in the database, before and after the store is opened again
    (the filter is rebuilt from the rows), so a producer's resend after a broker restart is still a
    duplicate."""
    store = BrokerStore.open(tmp_path / "state")
    known = [batch("j", n) for n in range(50)]
    for each in known:
        store.add(each)
    store.commit()  # their rows leave memory: found in the database from now on
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    assert all(store.get(f"never-{n}") is None for n in range(200))
    assert len(statements) < 20, statements  # a rare false positive asks the database, and finds nothing
    assert store.get(known[7].batch_id).batch_id == known[7].batch_id
    assert [s for s in statements if "SELECT" in s][-1:], "a known id is looked up in the database"
    store.close()
    reopened = BrokerStore.open(tmp_path / "state")
    assert all(reopened.get(each.batch_id) is not None for each in known)
    reopened.close()


def test_the_filter_of_seen_ids_never_forgets_one() -> None:
    """No false negative over many ids, and few false positives among as many others."""
    ids = [f"job-{n:08d}" for n in range(100_000)]
    seen = SeenIds(ids)
    assert all(batch_id in seen for batch_id in ids)
    wrong = sum(f"other-{n:08d}" in seen for n in range(100_000))
    assert wrong < 1_000  # about 0.01% at this size; a filter that said yes to everything would fail


def members_of(store: BrokerStore, row_id: str) -> list[str]:
    """The producer batches a row holds: a slice's members, or the batch itself."""
    held = store.batch(row_id)
    return [member.batch_id for member in held.members] or [row_id]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_batch_is_in_one_row_through_a_random_run_with_slices(tmp_path, monkeypatch, seed) -> None:
    """Slices form, are carved, run, dissolve and are written; throughout, each producer batch is in exactly one row that
    holds its claims (or is written), is found by its id with its content, and counts once in its status."""
    monkeypatch.setattr(store_module, "QUEUE_READ_AHEAD", 4)
    rng = random.Random(seed)
    store = BrokerStore.open(tmp_path / "state")
    path = tmp_path / "state" / STORE_FILE
    produced: dict[str, Batch] = {}
    slices: set[str] = set()
    assigned: list[str] = []
    written: set[str] = set()  # producer batches written
    for step in range(800):
        action = rng.choice(["add"] * 5 + ["commit", "assign", "assign", "carve", "complete", "dissolve", "requeue"])
        if action == "add":
            new = replace(batch(rng.choice("jk"), len(produced), claims=rng.randint(1, 3)),
                          template_id=rng.choice("tu"))  # fmt: skip
            produced[new.batch_id] = new
            store.add(new, slice_claims=6)
            found = store.submitted(new.batch_id)
            assert found is not None and found.content == store_module.content_digest(new), f"step {step}"
            if found.slice_id is not None:
                slices.add(found.slice_id)
        elif action == "commit":
            store.commit()
        elif action == "assign" and store.queued.get(CONTEXT):
            row, _ = store.next_queued_batch(CONTEXT)
            store.assign(row, b"w")
            assigned.append(row.batch_id)
        elif action == "carve" and store.queued.get(CONTEXT):  # a worker's share of the front slice
            row, held = store.next_queued_batch(CONTEXT)
            if row.members > 1:
                row, held = store.carve(row, held, rng.randint(1, row.members - 1))
                if row.members:
                    slices.add(row.batch_id)
            store.assign(row, b"w")
            assigned.append(row.batch_id)
        elif action == "complete" and assigned:  # done, delivered and written at once
            row_id = assigned.pop(rng.randrange(len(assigned)))
            held = store.batch(row_id)
            row = store.complete(store.get(row_id), result_for(held))
            store.deliver(row, b"sink")
            written.update(members_of(store, row_id))
            store.written(store.get(row_id))
        elif action == "dissolve" and any(store.get(i).members for i in assigned):
            row_id = rng.choice([i for i in assigned if store.get(i).members])
            assigned.remove(row_id)
            store.dissolve(store.get(row_id))
        elif action == "requeue" and assigned:
            store.requeue(store.get(assigned.pop(rng.randrange(len(assigned)))), count_attempt=False)
        if action != "commit":
            continue
        row_ids = slices | {batch_id for batch_id in produced if store.get(batch_id) is not None}
        committed = database_rows(path)
        assert committed == {row_id: as_columns(store, row_id) for row_id in row_ids}, f"step {step}"
        live: dict[str, str] = {}  # producer batch -> the row holding it, for rows neither written nor dissolved
        weights: dict[BatchStatus, int] = {}
        for row_id in row_ids:
            row = store.get(row_id)
            dissolved = row.status is BatchStatus.SPLIT and row.members  # its batches count as themselves
            weights[row.status] = weights.get(row.status, 0) + (0 if dissolved else row.members or 1)
            if row.status in (BatchStatus.WRITTEN, BatchStatus.SPLIT):
                continue
            held = store.batch(row_id)
            members = members_of(store, row_id)
            assert held.claims == [c for m in members for c in produced[m].claims], f"step {step}: {row_id}'s claims"
            assert len({(produced[m].job_id, produced[m].template_id) for m in members}) == 1
            assert row.pairs == len(held.claims) <= max(6, len(produced[members[0]].claims))
            for member in members:
                assert member not in live and member not in written, f"step {step}: {member} held twice"
                live[member] = row_id
        assert set(live) | written == set(produced) and not set(live) & written, f"step {step}"
        counted = {s: n for s, n in weights.items() if n}
        assert {s: n for s, n in store.status_counts.items() if n} == counted, f"step {step}: status counts"
    store.commit()
    counts = {s: n for s, n in store.status_counts.items() if n}
    store.close()
    reopened = BrokerStore.open(tmp_path / "state")
    reopened.recover()
    for batch_id, each in produced.items():  # every id known after the restart (the filter of seen ids too)
        found = reopened.submitted(batch_id)
        assert found is not None and found.content == store_module.content_digest(each)
    counts[BatchStatus.QUEUED] = counts.get(BatchStatus.QUEUED, 0) + counts.pop(BatchStatus.ASSIGNED, 0)
    assert {s: n for s, n in reopened.status_counts.items() if n} == counts
    reopened.close()
