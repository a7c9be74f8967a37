import dataclasses
import struct
from typing import ClassVar

import pytest

from apmae.messages import InvalidMessage, Record, decode, encode, stable_id
from apmae.topics import ALL_TOPICS, AssignmentRecord, FileRecord, PatternRecord, SampleRecord


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


def _with_header(header: bytes) -> bytes:
    return b"AP" + struct.pack(">BI", 1, len(header)) + header


SAMPLE_HEAD = encode(_sample())[7:]  # the header alone (a sample carries no payload)


@pytest.mark.parametrize(
    "field, literal, reason",
    [
        (b'"target_token":5', b'"target_token":NaN', "not JSON"),
        (b'"target_token":5', b'"target_token":-Infinity', "not JSON"),
        (b'"target_token":5', b'"target_token":1e999', "not JSON"),  # a float out of range, not inf
        (b'"target_token":5', b'"target_token":' + b"9" * 5000, "not JSON"),
        (b'"target_token":5', b'"target_token":18446744073709551616', "expected int"),  # 2**64: a float
        (b'"target":"foo"', b'"target":"\xff"', "not JSON"),  # not UTF-8
        (b'"target":"foo"', b'"target":' + b"[" * 2000 + b"]" * 2000, "nested too deeply"),
    ],
)
def test_the_header_parser_refuses_what_a_record_must_never_carry(field, literal, reason):
    """What the header's parsers (orjson, then the standard library's for what orjson
    refuses) refuse, each a message's own error: none of these may decode into a record (it
    could not be encoded again, or is not the declared type)."""
    assert field in SAMPLE_HEAD
    with pytest.raises(InvalidMessage, match=reason):
        decode(_with_header(SAMPLE_HEAD.replace(field, literal)), SampleRecord)
    assert decode(_with_header(SAMPLE_HEAD), SampleRecord) == _sample()  # the unaltered header decodes


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_encode_refuses_a_non_finite_float_rather_than_writing_null(bad):
    rec = AssignmentRecord(id="a", sample_id="s", model="m", task="identifier", layer=0, head=0, correct=True,
                           cluster=1, strength=bad, cluster_version="v1")
    with pytest.raises(ValueError, match="not a JSON number"):
        encode(rec)
    assert decode(encode(dataclasses.replace(rec, strength=0.25)), AssignmentRecord).strength == 0.25


@pytest.mark.parametrize("bad", [2**64, -(2**63) - 1, 10**30, 10**5000], ids=["2**64", "-2**63-1", "10**30", "10**5000"])
def test_encode_refuses_an_int_outside_64_bits(bad):
    # the header's reader would parse it as a float, which the int field then rejects
    with pytest.raises(ValueError, match="'target_token': an int of .* bits is outside 64 bits"):
        encode(_sample(target_token=bad))


@pytest.mark.parametrize("edge", [2**64 - 1, -(2**63), 0])
def test_ints_at_the_edges_of_64_bits_round_trip(edge):
    assert decode(encode(_sample(target_token=edge)), SampleRecord).target_token == edge


def test_a_file_name_that_is_not_utf8_round_trips():
    # os.walk and tarfile read such a name with surrogateescape: text orjson will not write
    path = b"src/Gr\xf6\xdfe.java".decode("utf-8", "surrogateescape")
    rec = FileRecord(id="f", source="dir", path=path, content="class A {}")
    value = encode(rec)
    assert b"\\udcf6" in value  # written escaped, as the standard library always did
    assert decode(value, FileRecord) == rec


def test_a_float_subclass_is_written_as_its_value():
    np = pytest.importorskip("numpy")
    rec = AssignmentRecord(id="a", sample_id="s", model="m", task="identifier", layer=0, head=0, correct=True,
                           cluster=1, strength=np.float64(0.25), cluster_version="v1")
    assert decode(encode(rec), AssignmentRecord).strength == 0.25
    with pytest.raises(ValueError, match="'strength': nan is not a JSON number"):
        encode(dataclasses.replace(rec, strength=np.float64("nan")))


def test_non_ascii_text_round_trips():
    rec = FileRecord(id="f", source="s", path="src/Größe.java", content="// 注释 \u00e9 é \U0001F600 😀\n")
    assert decode(encode(rec), FileRecord) == rec


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


# -- schema evolution: two builds of one record, the newer adding an optional field ----------


@dataclasses.dataclass(frozen=True)
class NoteV1_0(Record):
    SCHEMA: ClassVar[str] = "note"
    text: str = ""


@dataclasses.dataclass(frozen=True)
class NoteV1_1(Record):
    SCHEMA: ClassVar[str] = "note"
    MINOR: ClassVar[int] = 1
    text: str = ""
    lang: str | None = None  # the optional field 1.1 added


def test_an_older_reader_ignores_a_newer_minors_fields():
    new = encode(NoteV1_1(id="n", text="hi", lang="en"))
    assert decode(new, NoteV1_0) == NoteV1_0(id="n", text="hi")  # before: dead-lettered as unknown fields


def test_a_newer_reader_fills_an_older_minors_missing_fields():
    assert decode(encode(NoteV1_0(id="n", text="hi")), NoteV1_1) == NoteV1_1(id="n", text="hi", lang=None)


def test_unknown_fields_at_the_readers_own_minor_or_another_major_are_rejected():
    old = encode(NoteV1_0(id="n", text="hi"))
    typo = old.replace(b'"text"', b'"txet"')
    with pytest.raises(InvalidMessage, match=r"unknown fields \['txet'\] in a v1.0 message"):
        decode(typo, NoteV1_1)  # claims minor 0: a field this build does not know is a malformed message
    with pytest.raises(InvalidMessage, match="version 2 unsupported"):
        decode(encode(NoteV1_1(id="n")).replace(b'"v":1', b'"v":2'), NoteV1_0)


def test_a_decoded_record_is_the_record_its_init_makes():
    """decode fills a plain record's __dict__ itself (its frozen __init__ is 1.3 us of 5.1):
    the result must be what __init__ makes, defaults of fields the header leaves out included."""
    made = NoteV1_1(id="n", text="hi", lang=None)
    got = decode(encode(NoteV1_0(id="n", text="hi")), NoteV1_1)
    assert vars(got) == vars(made) and list(vars(got)) == list(vars(made))
    assert hash(got) == hash(made) and repr(got) == repr(made)
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.text = "changed"  # type: ignore[misc]


@dataclasses.dataclass(frozen=True)
class Checked(Record):
    SCHEMA: ClassVar[str] = "checked"
    size: int = 0

    def __post_init__(self):
        if self.size < 0:
            raise ValueError(f"size {self.size} is negative")


def test_a_record_with_its_own_checks_is_still_built_by_its_init():
    assert decode(encode(Checked(id="c", size=3)), Checked) == Checked(id="c", size=3)
    bad = object.__new__(Checked)  # what another build, without the check, could have written
    bad.__dict__.update(id="c", size=-3)
    with pytest.raises(InvalidMessage, match="size -3 is negative"):
        decode(encode(bad), Checked)


@dataclasses.dataclass(frozen=True)
class Lowered(Record):
    SCHEMA: ClassVar[str] = "lowered"
    name: str = ""

    def __init__(self, id: str, name: str = ""):  # an __init__ of its own: it normalises
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "name", name.lower())


@dataclasses.dataclass(frozen=True, slots=True)
class Slotted(Record):
    SCHEMA: ClassVar[str] = "slotted"
    n: int = 0


@dataclasses.dataclass(frozen=True)
class UnderSlots(Slotted):  # its fields live in its base's slots, not in a __dict__
    SCHEMA: ClassVar[str] = "under-slots"
    m: int = 0


def test_records_whose_fields_an_own_init_or_slots_hold_are_built_by_their_init():
    raw = object.__new__(Lowered)  # what another build could have written
    raw.__dict__.update(id="l", name="MiXed")
    assert decode(encode(raw), Lowered).name == "mixed"
    assert decode(encode(Slotted(id="s", n=3)), Slotted).n == 3
    got = decode(encode(UnderSlots(id="u", n=3, m=4)), UnderSlots)
    assert (got.n, got.m) == (3, 4)


def test_the_header_length_is_big_endian_and_bf16_patterns_little_endian():
    import numpy as np

    from apmae.codec import encode_pattern

    head = encode(NoteV1_0(id="n"))
    n = int.from_bytes(head[3:7], "big")
    assert head[7:7 + n].startswith(b'{"schema":"note"') and len(head) == 7 + n
    a = np.zeros((2, 2), dtype=np.float32)
    a[0, 0], a[1, 0], a[1, 1] = 1.0, 0.5, 0.5  # float32 0x3F800000 / 0x3F000000: exact in bfloat16
    assert encode_pattern(a) == b"\x80\x3f" + b"\x00\x3f" * 2
