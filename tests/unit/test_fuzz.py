"""Bad input, tried systematically (hypothesis): every parser gives a clear error, never a crash.

Each property feeds one entry point arbitrary, truncated, mutated, binary or adversarial
input and allows exactly the documented outcomes: a value, or the module's own error type
(InvalidMessage, BadPattern, CorpusError, a counted skip). Any other exception, or a hang
(hypothesis reports an example that runs past its deadline), fails the test. The counts
of cases tried are printed for the README's table (``-s``).
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apmae.codec import BadPattern, decode_pattern, encode_pattern
from apmae.corpus import CorpusError, CorpusStats, Limits, open_corpus
from apmae.messages import InvalidMessage, decode, encode
from apmae.tasks import mine_spans
from apmae.topics import AssignmentRecord, FileRecord, PatternRecord, SampleRecord

pytestmark = pytest.mark.unit
FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
TRIED: Counter = Counter()
RECORDS = [FileRecord, SampleRecord, PatternRecord, AssignmentRecord]


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print("\nbad-input cases tried:", dict(TRIED))  # the README's table (pytest -s)


def valid_pattern(n: int) -> np.ndarray:
    a = np.tril(np.random.default_rng(n).random((n, n))) + np.eye(n)
    return a / a.sum(1, keepdims=True)


# -- message decoders ------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=4096), st.sampled_from(RECORDS))
def test_arbitrary_bytes_never_crash_the_decoder(value, cls):
    TRIED["decode: arbitrary bytes"] += 1
    try:
        decode(value, cls, max_bytes=1 << 20)
    except InvalidMessage:
        pass


def sample_record() -> SampleRecord:
    return SampleRecord(id="s1", file_id="f", model="m", task="identifier", prompt_mode="fim", target="x",
                        target_token=1, predicted_token=2, predicted="y", correct=False, n_layers=2, n_heads=4)


@FUZZ
@given(st.data())
def test_mutated_and_truncated_messages_are_rejected_or_equal(data):
    TRIED["decode: mutated / truncated valid message"] += 1
    good = encode(sample_record())
    cut = data.draw(st.integers(0, len(good)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)), max_size=4))
    value = bytearray(good[:cut] if data.draw(st.booleans()) else good)
    for i, b in flips:
        if i < len(value):
            value[i] = b
    try:
        rec = decode(bytes(value), SampleRecord)
    except InvalidMessage:
        return
    assert isinstance(rec, SampleRecord)  # a mutation that still parses must give a valid record


@FUZZ
@given(st.dictionaries(st.text(max_size=12), st.one_of(st.none(), st.integers(), st.floats(allow_nan=False),
                                                        st.text(max_size=20), st.booleans()), max_size=14),
       st.integers(0, 3))
def test_wrong_schemas_versions_and_field_types_are_rejected(header, version):
    TRIED["decode: wrong schema / version / field types"] += 1
    import json
    import struct

    head = json.dumps({"schema": "sample", "v": version, **header}).encode()
    value = b"AP" + struct.pack(">BI", 1, len(head)) + head
    try:
        rec = decode(value, SampleRecord)
    except InvalidMessage:
        return
    assert isinstance(rec.id, str) and isinstance(rec.n_layers, int)


def _envelope(header: bytes) -> bytes:
    import struct

    return b"AP" + struct.pack(">BI", 1, len(header)) + header


POISON_HEADERS = {
    # each of these escaped the decoder as a non-InvalidMessage once: the consumer exited,
    # restarted at the same offset and crash-looped
    "nested 100k deep (RecursionError)": b'{"id":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "nested 100k deep, unterminated": b"[" * 100_000,
    "5000-digit int (ValueError)": b'{"schema":"sample","v":1,"n_layers":' + b"9" * 5000 + b"}",
    # decoded once, then could not be encoded again by whoever forwarded the record
    "NaN field": b'{"schema":"assignment","v":1,"strength":NaN}',
    "Infinity field": b'{"schema":"assignment","v":1,"strength":-Infinity}',
    "NaN version": b'{"schema":"sample","v":NaN}',
    "huge schema name": b'{"schema":"' + b"x" * 100_000 + b'"}',
}


@pytest.mark.parametrize("header", POISON_HEADERS.values(), ids=POISON_HEADERS.keys())
@pytest.mark.parametrize("cls", RECORDS + [AssignmentRecord])
def test_poison_headers_are_invalid_messages_with_a_short_reason(header, cls):
    TRIED["decode: poison header (deep, huge int, NaN)"] += 1
    with pytest.raises(InvalidMessage) as e:
        decode(_envelope(header), cls)
    assert len(str(e.value)) < 600  # a reason, not a copy of the message


# JSON literals as a hostile writer may send them: NaN / Infinity (Python's parser takes
# them), ints of 4000-6000 digits (the parser refuses more than 4300), floats of any size
LITERALS = st.one_of(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "true", "null", '""']),
                     st.integers(4000, 6000).map(lambda k: "9" * k), st.integers().map(str),
                     st.floats(allow_nan=False, allow_infinity=False).map(repr))


@FUZZ
@given(st.sampled_from([SampleRecord, AssignmentRecord]),
       st.dictionaries(st.sampled_from(["strength", "cluster", "correct", "n_layers", "target", "id", "v"]), LITERALS,
                       max_size=4))
def test_non_finite_and_huge_numbers_never_decode_into_a_record(cls, fields):
    TRIED["decode: NaN / Inf / huge numbers in fields"] += 1
    import json

    good = sample_record() if cls is SampleRecord else AssignmentRecord(
        id="a", sample_id="s", model="m", task="identifier", layer=0, head=0, correct=True, cluster=1, strength=0.5,
        cluster_version="v1")
    head = {k: json.dumps(v) for k, v in good.header().items()} | fields
    text = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in head.items()) + "}"
    try:
        rec = decode(_envelope(text.encode()), cls)
    except InvalidMessage:
        return
    assert encode(rec)  # whatever decodes can be forwarded (encode refuses NaN / Inf)


def test_oversized_message_is_rejected_before_parsing():
    TRIED["decode: over the size limit"] += 1
    big = encode(sample_record()) + b"x" * 5000
    with pytest.raises(InvalidMessage, match="exceeds"):
        decode(big, SampleRecord, max_bytes=4096)


# -- pattern codec ---------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=4096), st.integers(-4, 64), st.sampled_from(["bfloat16", "float32", "float64", ""]))
def test_arbitrary_payloads_never_crash_the_pattern_codec(buf, n, dtype):
    TRIED["codec: arbitrary payload / size / dtype"] += 1
    try:
        a = decode_pattern(buf, n, dtype)
    except BadPattern:
        return
    assert a.shape == (n, n) and np.isfinite(a).all()


@FUZZ
@given(st.integers(2, 32), st.sampled_from([np.nan, np.inf, -np.inf]), st.integers(0, 10_000),
       st.sampled_from(["bfloat16", "float32"]))
def test_non_finite_patterns_are_rejected(n, bad, where, dtype):
    TRIED["codec: NaN / Inf patterns"] += 1
    a = valid_pattern(n)
    r, c = np.tril_indices(n)
    a[r[where % len(r)], c[where % len(r)]] = bad
    with pytest.raises(BadPattern):
        encode_pattern(a, dtype)
    # and on the way in, whatever a producer wrote
    buf = encode_pattern(valid_pattern(n), dtype)
    width = 2 if dtype == "bfloat16" else 4
    raw = bytearray(buf)
    nan = (b"\xc0\x7f" if dtype == "bfloat16" else np.float32(bad).tobytes())
    i = (where % (len(raw) // width)) * width
    raw[i:i + width] = nan if dtype == "bfloat16" else np.array([bad], dtype="<f4").tobytes()
    with pytest.raises(BadPattern):
        decode_pattern(bytes(raw), n, dtype)


# -- task miner ------------------------------------------------------------------------------
JAVA_BITS = ["class A {", "}", "int x = 1;", "x += 2;", "if (a && b) {", "return \"s\";", "(", ")", "[", "]",
             "{", "/* c */", "// c\n", "'c'", "0x1F", "true", "a.b(c);", "\u00e9", "\x00", "\n"]


@FUZZ
@given(st.one_of(st.binary(max_size=3000),
                 st.lists(st.sampled_from(JAVA_BITS), max_size=300).map(lambda p: "".join(p).encode("utf-8"))))
def test_miner_survives_malformed_and_binary_java(source):
    TRIED["miner: malformed / binary Java"] += 1
    res = mine_spans(source)
    for spans in res.spans.values():
        for s in spans:
            assert 0 <= s.start < s.end <= len(source)


@pytest.mark.parametrize("depth", [5_000, 50_000])
def test_miner_bounds_work_on_deeply_nested_java(depth):
    TRIED["miner: deeply nested Java"] += 1
    source = ("class A { int f() { return " + "(" * depth + "1" + ")" * depth + "; } }").encode()
    res = mine_spans(source, max_depth=2000)  # returns (bounded walk), no RecursionError
    assert res.counts()["closing_bracket"] <= depth + 3


# -- corpus readers --------------------------------------------------------------------------
def _corpus(tmp_path, name: str, data: bytes, limits: Limits = Limits()) -> tuple[list, CorpusStats]:
    p = tmp_path / name
    p.write_bytes(data)
    stats = CorpusStats()
    try:
        return list(open_corpus(p, stats, limits)), stats
    except CorpusError:
        return [], stats


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2048), st.sampled_from(["c.zip", "c.tar", "c.tar.gz", "c.jsonl", "c.parquet"]))
def test_garbage_archives_are_a_clear_error(tmp_path, data, name):
    TRIED["corpus: garbage archive / jsonl / parquet"] += 1
    _corpus(tmp_path, name, data)


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for k, v in members.items():
            zf.writestr(k, v)
    return buf.getvalue()


@settings(max_examples=100, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.from_regex(r"[a-z]{1,8}\.java", fullmatch=True), st.binary(max_size=600), max_size=6),
       st.integers(0, 1))
def test_archive_members_binary_non_utf8_truncated(tmp_path, members, truncate):
    TRIED["corpus: binary / non-UTF-8 / truncated members"] += 1
    data = _zip(members)
    if truncate:
        data = data[: len(data) // 2]
    files, stats = _corpus(tmp_path, "m.zip", data)
    for f in files:
        assert f.content.encode("utf-8") in members.values()


def test_zip_bomb_stops_at_the_expansion_limit(tmp_path):
    TRIED["corpus: zip bomb"] += 1
    bomb = _zip({f"b{i}.java": b"a" * (1 << 20) for i in range(8)})  # 8 MiB from ~8 KiB
    assert len(bomb) < 64 << 10
    files, stats = _corpus(tmp_path, "bomb.zip", bomb, Limits(max_file_bytes=2 << 20, max_archive_bytes=3 << 20))
    assert len(files) == 3 and stats.skipped["archive expansion limit"] == 1


def test_tar_member_larger_than_the_file_limit_is_skipped(tmp_path):
    TRIED["corpus: oversized member"] += 1
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, size in (("small.java", 100), ("huge.java", 3 << 20)):
            info = tarfile.TarInfo(name)
            info.size = size
            tf.addfile(info, io.BytesIO(b"x" * size))
    files, stats = _corpus(tmp_path, "t.tar", buf.getvalue(), Limits(max_file_bytes=1 << 20))
    assert [f.path for f in files] == ["small.java"] and stats.skipped["oversized"] == 1


