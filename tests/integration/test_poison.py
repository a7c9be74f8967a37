"""Bad input through the processing loop itself: hypothesis feeds ``Processor.process_batch``
(the real one, on the real broker and Redis) batches of arbitrary, truncated, deeply nested,
huge-number and NaN/Inf-carrying messages between valid ones.

Property: the loop never raises on a message's account (a raise there is a crash loop: the
service exits, restarts at the same offset, and meets the same message), and every message
ends as exactly one output or exactly one dead letter. Valid, finite messages are outputs.

The handler forwards each record to its own topic and decodes a pattern's payload on the
way (NaN/Inf payloads raise there, so the loop's per-message isolation is exercised too).
Each message gets a unique id from its position, so outputs and dead letters can both be
matched back to the position they came from.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.consumer.fetcher import ConsumerRecord

from apmae.codec import decode_pattern, encode_pattern
from apmae.messages import Record, encode
from apmae.topics import (
    ASSIGNMENTS,
    DEADLETTER,
    PATTERNS_MINE,
    SAMPLES,
    AssignmentRecord,
    PatternRecord,
    SampleRecord,
)
from services.bus import Bus, DoneStore, Message, Output, Processor, read_range

pytestmark = pytest.mark.integration
TOPICS = {ASSIGNMENTS.name: ASSIGNMENTS, SAMPLES.name: SAMPLES, PATTERNS_MINE.name: PATTERNS_MINE}
SIZE = 8


def good_record(topic: str) -> Record:
    if topic == ASSIGNMENTS.name:
        return AssignmentRecord(id="a", sample_id="s", model="m", task="identifier", layer=0, head=1, correct=True,
                                cluster=2, strength=0.5, cluster_version="v1")
    if topic == SAMPLES.name:
        return SampleRecord(id="s", file_id="f", model="m", task="identifier", prompt_mode="fim", target="x",
                            target_token=1, predicted_token=2, predicted="y", correct=False, n_layers=2, n_heads=4)
    a = np.tril(np.ones((SIZE, SIZE)))
    return PatternRecord(id="p", sample_id="s", model="m", task="identifier", layer=0, head=0, correct=True, size=SIZE,
                         payload=encode_pattern(a / a.sum(1, keepdims=True)))


def envelope(header: bytes, payload: bytes = b"") -> bytes:
    return b"AP" + struct.pack(">BI", 1, len(header)) + header + payload


# A field value as a hostile or buggy writer may put it in the JSON header.
VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.booleans(), st.none(),
                   st.text(max_size=12), st.lists(st.integers(), max_size=3))
HUGE = ["9" * 5000, "[" * 100_000 + "]" * 100_000, "1e999", "NaN", "-Infinity"]


@st.composite
def message(draw):
    """(logical topic, value for a given id, valid-by-construction: True, False, or None for
    either). The id is the message's position, given later, so outputs can be matched back."""
    topic = draw(st.sampled_from(sorted(TOPICS)))
    rec = good_record(topic)
    kind = draw(st.sampled_from(["valid", "field", "huge", "nan payload", "bytes", "truncated"]))
    if kind == "valid" or (kind == "nan payload" and topic != PATTERNS_MINE.name):
        return topic, lambda i: encode(dataclasses.replace(rec, id=i)), True
    if kind == "bytes":
        junk = draw(st.binary(max_size=300))
        return topic, lambda i: junk, False
    if kind == "truncated":
        cut = draw(st.integers(0, len(encode(rec)) - 1))
        return topic, lambda i: encode(dataclasses.replace(rec, id=i))[:cut], None  # a cut payload may still decode
    if kind == "nan payload":
        bad = np.frombuffer(rec.payload, dtype="<u2").copy()
        bad[draw(st.integers(0, len(bad) - 1))] = 0x7FC0  # a bfloat16 NaN
        return topic, lambda i: encode(dataclasses.replace(rec, id=i, payload=bad.tobytes())), False
    name = draw(st.sampled_from([f.name for f in dataclasses.fields(rec) if f.name not in ("id", "payload")]))
    value = json.dumps(draw(VALUES), allow_nan=True) if kind == "field" else draw(st.sampled_from(HUGE))

    def make(i: str) -> bytes:
        head = {k: json.dumps(v) for k, v in dataclasses.replace(rec, id=i).header().items()} | {name: value}
        text = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in head.items()) + "}"
        return envelope(text.encode(), getattr(rec, "payload", b""))

    return topic, make, (False if kind == "huge" else None)


def test_process_batch_never_raises_and_accounts_for_every_message(bus_cfg, redis_client):
    bus = Bus(bus_cfg, "fuzz")
    bus.ensure_topics([*TOPICS.values(), DEADLETTER])

    def forward(msgs: list[Message]) -> list[Output]:
        out = []
        for m in msgs:
            r = m.record
            if isinstance(r, PatternRecord):
                decode_pattern(r.payload, r.size, r.dtype)  # raises BadPattern on NaN / Inf
            out.append(Output(bus.logical(m.topic), r))
        return out

    proc = Processor(bus, "fuzz", list(TOPICS.values()), forward, done=DoneStore(redis_client, bus_cfg.topic_prefix))
    offsets = itertools.count()
    sent: dict[int, bool | None] = {}  # offset -> valid by construction (None: either)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(message(), min_size=1, max_size=8))
    def batch(msgs):
        raws = []
        for topic, make, valid in msgs:
            off = next(offsets)
            sent[off] = valid
            value = make(f"o{off}")
            raws.append(ConsumerRecord(bus.name(topic), 0, -1, off, 0, 0, b"k", value, [], None, 1, len(value), 0))
        assert proc.process_batch(raws) == len(raws)

    batch()
    out = [int(m.record.id[1:]) for t in TOPICS.values() for m in read_range(bus, t)]
    dead = [m.record.offset for m in read_range(bus, DEADLETTER)]
    print("\nprocess_batch fuzz:", {"messages": len(sent), "out": len(out), "dead_lettered": len(dead)})
    assert sorted(out + dead) == sorted(sent)  # each exactly once, none lost, nothing invented
    assert not {o for o in dead if sent[o]}, "a valid, finite message was dead-lettered"
    assert not {o for o in out if sent[o] is False}, "an invalid message was forwarded"


def test_a_missing_file_dead_letters_its_message_and_a_full_disk_is_retried(bus_cfg, redis_client, tmp_path):
    """A FileNotFoundError (a deleted .npz, a rotated-out checkpoint) can never succeed on a
    retry: it dead-letters that message only, where it used to stall the partition forever.
    A full disk (ENOSPC) is the infrastructure's failure: the batch raises, to be retried."""
    import errno

    bus = Bus(bus_cfg, "fuzz")
    bus.ensure_topics([SAMPLES, DEADLETTER])
    for name in ("s0", "s2"):
        np.savez(tmp_path / f"{name}.npz", x=np.arange(3))

    def load(msgs: list[Message]) -> list[Output]:
        for m in msgs:
            with np.load(tmp_path / f"{m.record.id}.npz") as z:  # s1.npz does not exist
                assert z["x"].sum() == 3
        return [Output(SAMPLES, m.record) for m in msgs]

    raws = []
    for i in range(3):
        value = encode(dataclasses.replace(good_record(SAMPLES.name), id=f"s{i}"))
        raws.append(ConsumerRecord(bus.name(SAMPLES), 0, -1, i, 0, 0, b"k", value, [], None, 1, len(value), 0))
    Processor(bus, "npz", [SAMPLES], load).process_batch(raws)
    assert sorted(m.record.id for m in read_range(bus, SAMPLES)) == ["s0", "s2"]
    dead = [m.record for m in read_range(bus, DEADLETTER)]
    assert [d.offset for d in dead] == [1] and "FileNotFoundError" in dead[0].reason

    def disk_full(msgs: list[Message]) -> list[Output]:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        Processor(bus, "full", [SAMPLES], disk_full).process_batch(raws)
    assert len(list(read_range(bus, DEADLETTER))) == 1  # nothing more dead-lettered
