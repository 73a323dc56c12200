"""Each key speaks for one role: the broker's verbs as a key of each role (no sockets), and the key guard that
names a message's key and cuts a revoked key's connection (real CURVE sockets, in this process)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from pervade.broker.keyguard import KeyGuard
from pervade.broker.store import BatchStatus
from pervade.keyadmin import add_key
from pervade.keyring import KeyHolder, KeyRing, Role
from pervade.keys import ClientKeys, ServerKeys, init_keys
from pervade.protocol import (
    Completed,
    Disconnect,
    Error,
    Heartbeat,
    LoadContext,
    PeerKeys,
    ProducerReady,
    ProgressReply,
    ProgressRequest,
    Pull,
    SinkAck,
    SinkReady,
    StatusReply,
    StatusRequest,
    Submit,
    Verdict,
    WorkerReady,
    encode,
)
from pervade.roles import SENDS, may_send
from pervade.transport import dealer_socket, router_socket, start_authenticator
from tests.test_broker_verbs import CPU, A, Broker, assigned, batch, result_for

WORKER = KeyHolder(Role.WORKER, "node17", "W" * 40)
OTHER_WORKER = KeyHolder(Role.WORKER, "node18", "V" * 40)
PRODUCER = KeyHolder(Role.PRODUCER, "alice", "P" * 40)
SINK = KeyHolder(Role.SINK, "sink", "S" * 40)
MONITOR = KeyHolder(Role.MONITOR, "ops", "M" * 40)


@pytest.fixture
def broker(tmp_path) -> Broker:
    b = Broker(tmp_path / "state")
    yield b
    b.store.close()


def refusals(sent, identity: bytes) -> list[str]:
    return [m.reason for peer, m in sent if peer == identity and isinstance(m, Error)]


def test_a_producer_key_cannot_register_as_a_worker_take_work_or_answer_it(broker) -> None:
    broker.worker(b"w", contexts=[A], credit=4, key=WORKER)
    broker.worker(b"fake", contexts=[A], credit=8, key=PRODUCER)
    sent = broker.turn()
    assert set(broker.state.workers) == {b"w"}
    assert refusals(sent, b"fake") == [
        "the producer key 'alice' may not send 'worker_ready'", "the producer key 'alice' may not send 'pull'"
    ]  # fmt: skip
    broker.submit(batch("j", 0), batch("j", 1), key=PRODUCER)
    assert [peer for peer, _ in assigned(broker.turn())] == [b"w", b"w"]
    made_up = [
        Verdict(claim_id=v.claim_id, verdict="REFUTES", scores=[0, 0, 1]) for v in result_for(batch("j", 0)).verdicts
    ]
    forged = msgspec.structs.replace(result_for(batch("j", 0)), verdicts=made_up, worker_key="node17")
    broker(b"fake", Completed(result=forged), key=PRODUCER)
    assert refusals(broker.turn(), b"fake") == ["the producer key 'alice' may not send 'completed'"]
    assert broker.status("j/0") is BatchStatus.ASSIGNED  # still the real worker's to answer
    assert broker.state.counters["role_refusals"] == 3


def test_a_garbled_result_from_another_role_s_key_does_not_touch_the_batch(broker) -> None:
    broker.worker(b"w", contexts=[A], credit=1, key=WORKER)
    broker.submit(batch("j", 0), key=PRODUCER)
    broker.turn()
    garbled = encode(Completed(result=result_for(batch("j", 0))))
    garbled[1] = garbled[1].replace(b"SUPPORTS", b"\xff\xfe")  # invalid UTF-8: decodes to nothing
    broker.parts.router.handle([b"w", *garbled], SINK)  # a sink key, on the worker's identity
    broker.turn()
    assert broker.status("j/0") is BatchStatus.ASSIGNED and broker.state.counters["results_refused"] == 0


def test_a_sink_key_cannot_submit_and_a_monitor_key_can_only_read_status(broker) -> None:
    broker(b"s", SinkReady(sink_id="s"), key=SINK)
    broker(b"s", ProducerReady(producer_id="s"), Submit(batch=batch("j", 0)), key=SINK)
    sent = broker.turn()
    assert refusals(sent, b"s") == [
        "the sink key 'sink' may not send 'producer_ready'", "the sink key 'sink' may not send 'submit'"
    ]  # fmt: skip
    assert broker.store.get("j/0") is None and not broker.state.producers and b"s" in broker.state.sinks
    broker(b"m", StatusRequest(), ProgressRequest(), Heartbeat(), SinkReady(sink_id="m"), key=MONITOR)
    sent = broker.turn()
    assert [type(m) for peer, m in sent if peer == b"m"] == [StatusReply, ProgressReply, Error, Error]
    assert not broker.state.sinks.keys() - {b"s"}


def test_every_role_may_send_its_own_verbs_and_the_table_names_every_registration() -> None:
    assert may_send(Role.WORKER, WorkerReady) and not may_send(Role.WORKER, Submit)
    assert may_send(Role.PRODUCER, Submit) and not may_send(Role.PRODUCER, Completed)
    assert may_send(Role.SINK, SinkReady) and not may_send(Role.SINK, Pull)
    assert SENDS[Role.MONITOR] == {StatusRequest, ProgressRequest}
    assert all(may_send(role, ProgressRequest) for role in Role)  # a sink's bar, or anyone's
    registrations = {WorkerReady: Role.WORKER, ProducerReady: Role.PRODUCER, SinkReady: Role.SINK}
    for message, role in registrations.items():
        assert [r for r in Role if may_send(r, message)] == [role]


def test_a_result_names_the_key_that_sent_it_not_what_the_worker_wrote(broker) -> None:
    broker.worker(b"w", contexts=[A], credit=2, key=WORKER)
    broker.submit(batch("j", 0), batch("j", 1), key=PRODUCER)
    broker.turn()
    broker(
        b"w",
        Completed(result=msgspec.structs.replace(result_for(batch("j", 0)), worker_key="somebody-else")),
        key=WORKER,
    )
    broker(b"w", Completed(result=result_for(batch("j", 1))), key=WORKER)
    broker.turn()
    assert [broker.store.result(f"j/{n}").worker_key for n in (0, 1)] == ["node17", "node17"]
    assert broker.state.workers[b"w"].key == WORKER


def test_without_keys_a_result_names_no_key(broker) -> None:
    broker.worker(b"w", contexts=[A], credit=1)
    broker.submit(batch("j", 0))
    broker.turn()
    broker(b"w", Completed(result=msgspec.structs.replace(result_for(batch("j", 0)), worker_key="node17")))
    broker.turn()
    assert broker.store.result("j/0").worker_key == "" and broker.state.workers[b"w"].key is None


def test_a_revoked_key_s_workers_go_and_their_batches_are_requeued_uncharged(broker) -> None:
    broker.worker(b"w1", contexts=[A], credit=2, key=WORKER)
    broker.worker(b"w2", contexts=[A], credit=0, key=OTHER_WORKER)
    broker.submit(batch("j", 0), batch("j", 1), key=PRODUCER)
    assert [peer for peer, _ in assigned(broker.turn())] == [b"w1", b"w1"]
    assert broker.parts.liveness.drop_peers_of(WORKER) == 1
    assert set(broker.state.workers) == {b"w2"}
    broker(b"w2", Pull(credit=2), key=OTHER_WORKER)
    assert assigned(broker.turn()) == [(b"w2", "j/0"), (b"w2", "j/1")]
    # one attempt each: this assignment's; the revoked worker's was handed back, not charged
    assert [broker.store.get(f"j/{n}").attempts for n in (0, 1)] == [1, 1]


# --- the key guard over real CURVE sockets -------------------------------------------------------------


async def test_the_guard_names_each_message_s_key_and_cuts_a_revoked_one_within_a_second(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    init_keys(keys)
    node = add_key(keys, "worker", "node17")
    assert node.bundle is not None
    server = ServerKeys.load(keys)
    ring = KeyRing(server.authorized)
    counters: Counter[str] = Counter()
    guard = KeyGuard(ring, counters)
    ctx = zmq.asyncio.Context()
    auth = start_authenticator(ctx, ring)
    router = router_socket(ctx, "tcp://127.0.0.1:*", keys=server)
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    client = dealer_socket(ctx, endpoint, "worker-x", ClientKeys.load(node.bundle, "worker"))
    events = client.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    try:
        guard.step(time.monotonic())  # the first reading, on a thread
        await client.send_multipart(encode(Heartbeat()))
        frames = await asyncio.wait_for(router.recv_multipart(copy=False), 10)
        assert guard.sender(frames[0]) == node.holder
        changes = guard.step(time.monotonic())
        while changes.worker_keys is None:  # until the first reading is done: every worker key is news
            await asyncio.sleep(0.05)
            changes = guard.step(time.monotonic())
        assert changes.revoked == [] and changes.worker_keys == {
            ClientKeys.load(keys, "worker").public.decode(),
            node.holder.public,
        }

        (keys / "authorized" / "worker" / "node17.key").unlink()
        revoked_at = time.monotonic()
        revoked: list[KeyHolder] = []
        while not revoked and time.monotonic() - revoked_at < 5:
            await asyncio.sleep(0.05)  # the guard's own schedule: a reading every WATCH_INTERVAL_S
            changes = guard.step(time.monotonic())
            revoked = changes.revoked
        assert revoked == [node.holder] and changes.worker_keys == {ClientKeys.load(keys, "worker").public.decode()}
        assert guard.cut(node.holder.public) == 1
        event = parse_monitor_message(await asyncio.wait_for(events.recv_multipart(), 5))
        assert event["event"] == zmq.EVENT_DISCONNECTED and time.monotonic() - revoked_at < 1.5
        event = parse_monitor_message(await asyncio.wait_for(events.recv_multipart(), 10))
        assert event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH  # reconnecting with it is refused

        with contextlib.suppress(zmq.Again):  # times out when no connection is up; queued during a handshake
            await client.send_multipart(encode(Heartbeat()))
        assert not await router.poll(500)  # either way, it never arrives: no connection of this key is admitted
        frames_from_before = frames
        assert guard.sender(frames_from_before[0]) is None and counters["unadmitted_messages"] == 1
    finally:
        await guard.finish()
        events.close()
        client.close(0)
        router.close(0)
        auth.stop()
        ctx.term()


def test_workers_hear_which_worker_keys_their_file_services_admit(broker) -> None:
    broker.state.worker_keys = frozenset({WORKER.public})  # a broker with keys, as the key guard read them
    broker.worker(b"w1", key=WORKER)
    assert broker.to(b"w1") == [PeerKeys(keys=[WORKER.public])]
    broker.parts.workers.vouch_for(frozenset({WORKER.public, OTHER_WORKER.public}))
    assert broker.to(b"w1") == [PeerKeys(keys=sorted([WORKER.public, OTHER_WORKER.public]))]
    broker.state.worker_keys = None  # without keys: never sent
    broker.worker(b"w2")
    assert not [m for m in broker.to(b"w2") if isinstance(m, PeerKeys)]


def test_another_key_cannot_act_for_a_registered_peer_under_its_identity(broker) -> None:
    broker.worker(b"w", contexts=[A], credit=1, key=WORKER)
    broker.submit(batch("j", 0), key=PRODUCER)
    broker.turn()
    broker(b"w", Disconnect(reason="leaving"), Heartbeat(), key=OTHER_WORKER)  # the identity, not the key
    broker(b"w", Completed(result=result_for(batch("j", 0))), key=OTHER_WORKER)
    sent = broker.turn()
    assert len(refusals(sent, b"w")) == 3 and all("registered under another key" in r for r in refusals(sent, b"w"))
    assert b"w" in broker.state.workers and broker.status("j/0") is BatchStatus.ASSIGNED


def test_a_worker_key_answers_only_batches_it_was_given_an_earlier_assignee_included(broker) -> None:
    broker.worker(b"w1", contexts=[A], credit=1, key=WORKER)
    broker.worker(b"w2", contexts=[A], key=OTHER_WORKER)
    broker.submit(batch("j", 0), key=PRODUCER)
    assert assigned(broker.turn()) == [(b"w1", "j/0")]
    broker(b"w2", Completed(result=result_for(batch("j", 0), worker_id="w2")), key=OTHER_WORKER)
    assert refusals(broker.turn(), b"w2") == [
        "result for 'j/0' from the key worker/node18, which it was never assigned to"
    ]
    assert broker.status("j/0") is BatchStatus.ASSIGNED
    broker.parts.liveness.drop_peers_of(WORKER)  # w1's key revoked: j/0 goes to w2
    broker(b"w2", Pull(credit=1), key=OTHER_WORKER)
    assert assigned(broker.turn()) == [(b"w2", "j/0")]
    broker(b"w2", Completed(result=result_for(batch("j", 0), worker_id="w2")), key=OTHER_WORKER)
    broker.turn()
    assert broker.store.result("j/0").worker_key == "node18" and not broker.state.given_to


def test_another_key_s_worker_never_takes_a_name_it_holds_and_both_are_kept(broker) -> None:
    broker.worker(b"a", contexts=[A], credit=1, key=WORKER)
    broker.submit(batch("j", 0), key=PRODUCER)
    broker.turn()
    broker(b"b", WorkerReady(worker_id="a", host="h", pid=2, device=CPU, instance=""), key=OTHER_WORKER)
    broker.turn()
    assert {w.identity: str(w.key) for w in broker.state.workers.values()} == {
        b"a": "worker/node17", b"b": "worker/node18"
    }  # fmt: skip
    assert broker.status("j/0") is BatchStatus.ASSIGNED and broker.store.get("j/0").worker == b"a"


def test_only_a_sink_key_a_batch_was_delivered_to_acknowledges_it(broker) -> None:
    other_sink = KeyHolder(Role.SINK, "other", "O" * 40)
    broker(b"s1", SinkReady(sink_id="s1"), key=SINK)
    broker.worker(b"w", contexts=[A], credit=1, key=WORKER)
    broker.submit(batch("j", 0), key=PRODUCER)
    broker.turn()
    broker(b"w", Completed(result=result_for(batch("j", 0))), key=WORKER)
    broker.turn()
    assert broker.status("j/0") is BatchStatus.DELIVERED
    broker(b"s2", SinkReady(sink_id="s2"), SinkAck(batch_ids=["j/0"]), key=other_sink)
    broker.turn()
    assert broker.status("j/0") is BatchStatus.DELIVERED and broker.state.counters["sink_acks_refused"] == 1
    broker(b"s1", SinkAck(batch_ids=["j/0"]), key=SINK)
    broker.turn()
    assert broker.status("j/0") is BatchStatus.WRITTEN and not broker.state.delivered_to


def test_load_context_is_never_sent_to_a_refused_registration(broker) -> None:
    broker.submit(batch("j", 0), key=PRODUCER)
    broker(b"fake", WorkerReady(worker_id="fake", host="h", pid=1, device=CPU), Pull(credit=1), key=PRODUCER)
    assert not [m for peer, m in broker.turn() if peer == b"fake" and isinstance(m, LoadContext)]
    assert broker.status("j/0") is BatchStatus.QUEUED
