import pytest

from apmae.messages import InvalidMessage, decode, encode, stable_id
from apmae.topics import ALL_TOPICS, FileRecord, PatternRecord, SampleRecord


def _sample(**kw):
    base = dict(id="s1", file_id="f1", model="m", task="identifier", prompt_mode="fim", target="foo",
                target_token=5, predicted_token=5, predicted="foo", correct=True, n_layers=2, n_heads=4)
    return SampleRecord(**(base | kw))


def test_round_trip_with_payload():
    rec = PatternRecord(id="p", sample_id="s", model="m", task="random", layer=1, head=2, correct=True,
                        size=4, payload=b"\x00\x01" * 10)
    assert decode(encode(rec), PatternRecord) == rec


def test_optional_fields_and_none():
    rec = _sample(correct=None)
    assert decode(encode(rec), SampleRecord).correct is None
    assert decode(encode(FileRecord(id="a", source="s", path="p", content="x")), FileRecord).license is None


@pytest.mark.parametrize(
    "value, reason",
    [
        (b"", "shorter than"),
        (b"XX\x01\x00\x00\x00\x02{}", "bad magic"),
        (b"AP\x01\x00\x00\x00\x99{}", "runs past the end"),
        (b"AP\x01\x00\x00\x00\x02[]", "not a JSON object"),
        (b"AP\x01\x00\x00\x00\x03\xff\xfe{", "not JSON"),
    ],
)
def test_malformed_envelopes_say_why(value, reason):
    with pytest.raises(InvalidMessage, match=reason):
        decode(value, SampleRecord)


def test_schema_version_types_and_size_are_validated():
    good = encode(_sample())
    with pytest.raises(InvalidMessage, match="schema 'sample' where 'file'"):
        decode(good, FileRecord)
    bumped = good.replace(b'"v":1', b'"v":9')
    with pytest.raises(InvalidMessage, match="version 9 unsupported"):
        decode(bumped, SampleRecord)
    with pytest.raises(InvalidMessage, match="'target_token': expected int"):
        decode(encode(_sample(target_token="5")), SampleRecord)
    with pytest.raises(InvalidMessage, match="exceeds"):
        decode(good, SampleRecord, max_bytes=10)


def test_stable_ids_are_deterministic_and_distinct():
    assert stable_id("a", 1) == stable_id("a", 1)
    assert stable_id("a", 1) != stable_id("a", 2) != stable_id("a1")


def test_every_topic_declares_a_record_with_schema():
    names = {t.record.SCHEMA for t in ALL_TOPICS}
    assert len(ALL_TOPICS) == len({t.name for t in ALL_TOPICS})
    assert "pattern" in names and "deadletter" in names
