"""The wire protocol: every message round-trips, and every malformed frame is refused with a reason."""

from __future__ import annotations

import msgpack
import pytest

from pervade import protocol as PROTO
from pervade.constants import PROTOCOL_HEADER
from pervade.context import ContextSpec, make_context
from pervade.errors import ConfigError, ProtocolError
from pervade.protocol import (
    ALL_MESSAGES,
    Accepted,
    Assign,
    Batch,
    BatchResult,
    Claim,
    Completed,
    DeviceInfo,
    Pull,
    Submit,
    Verdict,
    WorkerReady,
    bodies,
    decode,
    decode_body,
    decode_group,
    encode,
    encode_group,
    kind_of,
)

CONTEXT = ContextSpec(model="HuggingFaceTB/SmolLM2-1.7B-Instruct")


def make_batch(n: int = 3) -> Batch:
    return Batch(
        batch_id="job-1/0000000/direct",
        job_id="job-1",
        context=CONTEXT,
        template_id="direct",
        template="Claim: {claim}\nAnswer:",
        claims=[Claim(claim_id=str(i), text=f"claim {i}", gold_label="SUPPORTS" if i % 2 else None) for i in range(n)],
        submitted_at=1.5,
    )


def test_batch_messages_round_trip_exactly() -> None:
    result = BatchResult(
        batch_id="b", job_id="j", context_id=CONTEXT.context_id, model=CONTEXT.model, template_id="t",
        worker_id="w", device="cpu", submitted_at=1.0, started_at=2.0, finished_at=3.0,
        verdicts=[Verdict(claim_id="1", verdict="REFUTES", scores=[0.1, 0.9, -2.0], gold_label=None)],
    )  # fmt: skip
    for message in (Submit(batch=make_batch()), Assign(batch=make_batch()), Completed(result=result)):
        assert decode(encode(message)) == message


def test_a_group_carries_messages_in_order_within_its_limits() -> None:
    small = [Pull(credit=1 + k % 1024) for k in range(PROTO.MAX_GROUP_MESSAGES + 1)]
    groups = encode_group(small)
    assert [len(frames) for frames in groups] == [2, 2]  # the header, then the group as one frame
    assert [len(bodies(frames)) for frames in groups] == [PROTO.MAX_GROUP_MESSAGES, 1]
    assert [decode_body(body) for frames in groups for body in bodies(frames)] == small
    big = Submit(batch=make_batch(8000))  # one message larger than GROUP_BYTES travels alone
    assert len(encode(big)[1]) > PROTO.GROUP_BYTES
    groups = encode_group([Pull(credit=1), big, Pull(credit=2)])
    assert [[decode_body(b) for b in bodies(f)] for f in groups] == [[Pull(credit=1)], [big], [Pull(credit=2)]]
    with pytest.raises(ProtocolError, match="expected one message, got a group of 2"):
        decode([PROTOCOL_HEADER, encode(Pull(credit=1))[1], encode(Pull(credit=2))[1]])
    with pytest.raises(ProtocolError, match="at most 4096 are read"):
        bodies([PROTOCOL_HEADER] + [b"x"] * (PROTO.MAX_GROUP_MESSAGES + 1))


def test_a_group_frame_is_read_within_its_limits_and_each_message_alone() -> None:
    packed = encode_group([Pull(credit=1), Pull(credit=2), Pull(credit=3)])[0][1]
    # Frames of one message each, as a version-3 peer sent them, and packed groups, mixed: read in order.
    mixed = [PROTOCOL_HEADER, encode(Pull(credit=9))[1], packed]
    assert [decode_body(b) for b in bodies(mixed)] == [Pull(credit=c) for c in (9, 1, 2, 3)]
    with pytest.raises(ProtocolError, match="not msgpack"):
        bodies([PROTOCOL_HEADER, packed[:-1]])  # cut short: none of it is read
    with pytest.raises(ProtocolError, match="a group of 65535 messages; at most 4096 are read"):
        bodies([PROTOCOL_HEADER, b"\xdc\xff\xff" + packed[1:]])  # refused on its declared length, unread
    with pytest.raises(ProtocolError, match="at most 4096"):  # empty groups count: each frame is read
        bodies([PROTOCOL_HEADER] + [b"\x90"] * (PROTO.MAX_GROUP_MESSAGES + 1))
    pull = encode(Pull(credit=1))[1]
    assert len(bodies([PROTOCOL_HEADER, b"\xdd\x00\x00\x00\x02" + pull + pull])) == 2  # a 32-bit length too
    with pytest.raises(ProtocolError, match="at most 4096"):
        bodies([PROTOCOL_HEADER, b"\xdd\x00\x01\x00\x00" + pull])
    with pytest.raises(ProtocolError, match="not msgpack"):  # splitting walks nested values: deep ones
        bodies([PROTOCOL_HEADER, b"\x91" * 1000 + b"\xc0"])  # raised RecursionError, not a refusal
    # A message of a group that does not decode costs itself alone.
    bad = msgpack.packb({"kind": "pull", "credit": "lots"})
    group = b"\x93" + encode(Pull(credit=1))[1] + bad + encode(Pull(credit=2))[1]
    messages, errors = decode_group([PROTOCOL_HEADER, group])
    assert messages == [Pull(credit=1), Pull(credit=2)] and len(errors) == 1 and "Expected `int`" in errors[0]


def test_every_message_kind_is_distinct_and_named() -> None:
    kinds = [m.__struct_config__.tag for m in ALL_MESSAGES]
    assert len(kinds) == len(set(kinds))
    assert kind_of(Pull(credit=2)) == "pull"


def test_body_is_plain_msgpack_with_a_kind_field() -> None:
    header, body = encode(Accepted(batch_id="b-1"))
    assert header == PROTOCOL_HEADER
    assert msgpack.unpackb(body) == {"kind": "accepted", "batch_id": "b-1"}


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([PROTOCOL_HEADER], "expected a header and 1 to"),
        ([b"pervade/0", msgpack.packb({"kind": "heartbeat"})], "unsupported protocol header"),
        ([b"MDPW01", b"x"], "unsupported protocol header"),
        ([PROTOCOL_HEADER, b"\xc1\xff garbage"], "invalid message"),
        ([PROTOCOL_HEADER, msgpack.packb({"kind": "launch_missiles"})], "invalid message"),
        ([PROTOCOL_HEADER, msgpack.packb({"batch_id": "b"})], "invalid message"),
        ([PROTOCOL_HEADER, msgpack.packb({"kind": "pull", "credit": "lots"})], "Expected `int`, got `str`"),
        ([PROTOCOL_HEADER, msgpack.packb({"kind": "pull", "credit": 0})], "Expected `int` >= 1"),
        ([PROTOCOL_HEADER, msgpack.packb({"kind": "pull", "credit": 1, "extra": 1})], "unknown field"),
        ([PROTOCOL_HEADER, msgpack.packb("a string")], "invalid message"),  # an array is a group (of 3 here)
        ([PROTOCOL_HEADER, msgpack.packb([1, 2, 3])], "expected one message, got a group of 3"),
        # found by the fuzz test: invalid UTF-8 in a string, and a time no Parquet file can hold
        ([PROTOCOL_HEADER, b"\x81\xa4kind\xa2\xff\xfe"], "invalid message"),
        ([PROTOCOL_HEADER, msgpack.packb({"kind": "deliver", "result": {
            "batch_id": "b", "job_id": "j", "context_id": "c", "model": "m", "template_id": "t", "worker_id": "w",
            "device": "cpu", "submitted_at": 0.0, "started_at": float("inf"), "finished_at": 0.0, "verdicts": [],
        }})], "Expected `float` <= 253402300799"),
    ],
)
def test_malformed_frames_are_refused_with_a_reason(frames: list[bytes], reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode(frames)


def test_nested_validation_names_the_bad_field() -> None:
    body = msgpack.unpackb(encode(Submit(batch=make_batch()))[1])
    body["batch"]["claims"][1]["text"] = 42
    with pytest.raises(ProtocolError, match=r"\$\.batch\.claims\[1\]\.text"):
        decode([PROTOCOL_HEADER, msgpack.packb(body)])


def test_empty_batches_and_wrong_score_counts_are_refused() -> None:
    body = msgpack.unpackb(encode(Submit(batch=make_batch()))[1])
    body["batch"]["claims"] = []
    with pytest.raises(ProtocolError, match="length >= 1"):
        decode([PROTOCOL_HEADER, msgpack.packb(body)])
    verdict = {"claim_id": "1", "verdict": "SUPPORTS", "scores": [1.0, 2.0]}
    with pytest.raises(ProtocolError, match="length >= 3"):
        decode([PROTOCOL_HEADER, msgpack.packb({"kind": "completed", "result": {
            "batch_id": "b", "job_id": "j", "context_id": "c", "model": "m", "template_id": "t", "worker_id": "w",
            "device": "cpu", "submitted_at": 0, "started_at": 0, "finished_at": 0, "verdicts": [verdict]}})])  # fmt: skip


def test_worker_ready_defaults() -> None:
    ready = WorkerReady(worker_id="w", host="h", pid=1, device=DeviceInfo(kind="cpu", name="cpu"))
    decoded = decode(encode(ready))
    assert decoded == ready and decoded.max_contexts == 1 and decoded.contexts == []


def test_context_id_is_stable_and_depends_on_every_field(tmp_path) -> None:
    a = ContextSpec(model="m")
    assert a.context_id == ContextSpec(model="m").context_id
    assert len({a.context_id, ContextSpec(model="m", dtype="bfloat16").context_id,
                ContextSpec(model="m", revision="v2").context_id, ContextSpec(model="n").context_id}) == 4  # fmt: skip
    # a local directory's context is named by its files' content, wherever they live
    for name in ("model", "copy"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    here, there = make_context(str(tmp_path / "model")), make_context(str(tmp_path / "copy"))
    assert here.spec.model == str((tmp_path / "model").resolve())
    assert here.context_id == there.context_id and here.spec.files == here.manifest.digest
    assert make_context(str(tmp_path / "copy"), dtype="bfloat16").context_id != here.context_id
    (tmp_path / "copy" / "config.json").write_text("{ }")
    assert make_context(str(tmp_path / "copy")).context_id != here.context_id
    with pytest.raises(ConfigError, match="unknown dtype"):
        make_context("m", dtype="float8")
