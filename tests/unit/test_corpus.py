"""Corpus readers against a hostile file system: symlinks out of the corpus, FIFOs, devices,
giant and deeply nested JSON Lines. Each reader reads regular files inside the corpus root
only, in bounded memory, and counts what it skipped; nothing here may hang or exhaust memory.
"""

from __future__ import annotations

import json
import os
import tracemalloc

import pytest

from apmae.corpus import CorpusStats, Limits, open_corpus, read_directory, read_jsonl

pytestmark = pytest.mark.unit
JAVA = "class A { int f() { return 1; } }\n"


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "A.java").write_text(JAVA)
    return root


def paths(root, limits: Limits = Limits()) -> tuple[dict[str, str], CorpusStats]:
    stats = CorpusStats()
    return {f.path: f.content for f in read_directory(root, stats, limits)}, stats


def test_symlinks_out_of_the_root_are_skipped_not_followed(corpus, tmp_path):
    secret = tmp_path / "secret.java"
    secret.write_text("class Secret { String key = \"s3cr3t\"; }")
    (corpus / "zero.java").symlink_to("/dev/zero")  # was read until memory ran out
    (corpus / "leak.java").symlink_to(secret)  # was read into the corpus
    (corpus / "up.java").symlink_to("../secret.java")
    got, stats = paths(corpus)
    assert got == {"pkg/A.java": JAVA}
    assert stats.skipped["symlink out of the corpus root"] == 3


def test_symlinks_inside_the_root_are_read_and_linked_directories_not_walked(corpus, tmp_path):
    (corpus / "B.java").symlink_to(corpus / "pkg" / "A.java")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "C.java").write_text("class C {}")
    (corpus / "linked").symlink_to(outside, target_is_directory=True)
    (corpus / "loop").symlink_to(corpus, target_is_directory=True)  # a cycle
    got, _ = paths(corpus)
    assert got == {"pkg/A.java": JAVA, "B.java": JAVA}


def test_a_fifo_or_device_named_like_source_is_skipped_without_blocking(corpus):
    os.mkfifo(corpus / "pipe.java")  # opening it for reading used to block until a writer came
    (corpus / "null.java").symlink_to("/dev/null")
    got, stats = paths(corpus)
    assert got == {"pkg/A.java": JAVA}
    assert stats.skipped["not a regular file"] == 1 and stats.skipped["symlink out of the corpus root"] == 1


def test_a_fifo_as_the_corpus_itself_is_a_clear_error(tmp_path):
    os.mkfifo(tmp_path / "c.jsonl")
    with pytest.raises(ValueError, match="not a regular file"):
        list(open_corpus(tmp_path / "c.jsonl", CorpusStats()))


def test_oversized_files_are_skipped_by_size_before_reading(corpus):
    (corpus / "Big.java").write_text("x" * 5000)
    got, stats = paths(corpus, Limits(max_file_bytes=4096))
    assert "Big.java" not in got and stats.skipped["oversized"] == 1


def line(**obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def test_a_giant_jsonl_line_is_skipped_in_bounded_memory(tmp_path):
    p = tmp_path / "c.jsonl"
    limit = 256 << 10  # lines up to 1 MiB (4x: JSON escapes)
    with open(p, "wb") as f:
        f.write(line(content=JAVA, path="a.java"))
        f.write(b'{"content": "' + b"x" * (48 << 20) + b'"}\n')  # 48 MiB on one line
        f.write(line(content=JAVA + "//2", path="b.java"))
    stats = CorpusStats()
    tracemalloc.start()
    try:
        got = [f.path for f in read_jsonl(p, stats, Limits(max_file_bytes=limit))]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == ["a.java", "b.java"] and stats.skipped["oversized"] == 1
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB: the long line was read whole"


def test_hostile_jsonl_lines_are_counted_and_the_rest_read(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_bytes(
        b'{"content": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"  # RecursionError in json
        + b'{"content": "x", "n": ' + b"9" * 5000 + b"}\n"  # ValueError: int over 4300 digits
        + line(content=JAVA, path=["not", "a", "string"])
        + b"[1, 2]\n" + b"not json\n" + b"\xff\xfe\n"
        + line(content=JAVA, path="ok.java"))
    stats = CorpusStats()
    got = [f.path for f in read_jsonl(p, stats)]
    assert got == ["ok.java"]
    assert stats.skipped["json nested too deeply"] == 1 and stats.skipped["malformed json line"] == 5
