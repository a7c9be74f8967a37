"""Ingest against the real broker and Redis: dedupe across runs, follow mode, bad files."""

from __future__ import annotations

import threading
import time
import zipfile
from pathlib import Path

from apmae.corpus import CorpusStats, content_id, open_corpus
from apmae.topics import FILES
from services.bus import read_range
from services.ingest import Ingest, IngestConfig


def cfg_for(bus_cfg, corpus: Path, **kw) -> IngestConfig:
    return IngestConfig(**vars(bus_cfg), corpus=str(corpus), **kw)


def write_corpus(root: Path) -> None:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "A.java").write_text("class A { int a = 1; }\n")
    (root / "pkg" / "B.java").write_text("class B { int b = 2; }\n")
    (root / "pkg" / "Copy.java").write_text("class A { int a = 1; }\n")  # same content as A
    (root / "pkg" / "Bad.java").write_bytes(b"class \xff\xfe {}")  # not UTF-8
    (root / "pkg" / "Big.java").write_text("x" * 5000)
    (root / "notes.txt").write_text("not java")


def test_ingest_dedupes_across_runs_and_counts_skips(bus_cfg, tmp_path):
    write_corpus(tmp_path / "c")
    first = Ingest(cfg_for(bus_cfg, tmp_path / "c", max_file_bytes=4096)).run(progress=False)
    assert first["published"] == 2 and first["duplicates"] == 1
    assert first["skipped"] == {"not utf-8": 1, "oversized": 1}
    second = Ingest(cfg_for(bus_cfg, tmp_path / "c", max_file_bytes=4096)).run(progress=False)
    assert second["published"] == 0 and second["duplicates"] == 3
    msgs = list(read_range(__import__("services.bus", fromlist=["Bus"]).Bus(bus_cfg), FILES))
    assert sorted(m.record.id for m in msgs) == sorted({content_id("class A { int a = 1; }\n"),
                                                        content_id("class B { int b = 2; }\n")})


def test_follow_mode_picks_up_new_and_changed_files(bus_cfg, tmp_path):
    root = tmp_path / "w"
    root.mkdir()
    (root / "One.java").write_text("class One {}")
    job = Ingest(cfg_for(bus_cfg, root, follow=True, follow_interval_s=0.3))
    t = threading.Thread(target=job.run, kwargs={"progress": False})
    t.start()
    deadline = time.monotonic() + 30
    while job.published < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    (root / "Two.java").write_text("class Two {}")
    time.sleep(0.05)
    (root / "One.java").write_text("class One { int changed; }")
    while job.published < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    job.stop.set()
    t.join(30)
    assert job.published == 3


def test_zip_corpus_with_bomb_guard(tmp_path):
    z = tmp_path / "src.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/A.java", "class A {}")
        zf.writestr("a/Huge.java", "0" * 3_000_000)  # compresses to a few KB
        zf.writestr("a/readme.md", "x")
    stats = CorpusStats()
    files = list(open_corpus(z, stats))
    assert [f.path for f in files] == ["a/A.java"] and stats.skipped["oversized"] == 1


def test_heap_parquet_drops_training_duplicates_and_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "content": ["class A {}", "class B {}", "class C {}"], "file_path": ["A.java", "B.java", "C.java"],
        "repo_name": ["r/a", "r/b", "r/c"], "repo_license": ["MIT", "Apache-2.0", "MIT"],
        "exact_duplicates_stackv2": [False, True, False], "near_duplicates_stackv2": [False, False, True],
    }), tmp_path / "shard-0.parquet")
    stats = CorpusStats()
    got = list(open_corpus(tmp_path, stats))
    assert [(f.path, f.license, f.repo) for f in got] == [("A.java", "MIT", "r/a")]
    assert stats.skipped["duplicate of stackv2"] == 2
    assert len(list(open_corpus(tmp_path, CorpusStats(), drop_duplicates_of=""))) == 3
    j = tmp_path / "c.jsonl"
    j.write_text('{"content": "class J {}", "path": "J.java"}\nnot json\n{"no": 1}\n')
    s2 = CorpusStats()
    assert [f.path for f in open_corpus(j, s2)] == ["J.java"] and s2.skipped["malformed json line"] == 2


def test_a_file_whose_name_is_not_utf8_is_published_and_read_back(bus_cfg, tmp_path):
    # os.walk reads the name with surrogateescape: text the header's fast writer (orjson)
    # refuses; the standard library's writes it escaped, and the reader takes it back
    root = tmp_path / "c"
    root.mkdir()
    name = b"Gr\xf6\xdfe.java"
    with open(bytes(root) + b"/" + name, "w") as f:
        f.write("class G { int g = 3; }\n")
    stats = Ingest(cfg_for(bus_cfg, root)).run(progress=False)
    assert stats["published"] == 1
    msgs = list(read_range(__import__("services.bus", fromlist=["Bus"]).Bus(bus_cfg), FILES))
    assert len(msgs) == 1 and msgs[0].record.content == "class G { int g = 3; }\n"
    assert msgs[0].record.path.endswith(name.decode("utf-8", "surrogateescape"))
