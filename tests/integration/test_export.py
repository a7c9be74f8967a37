"""`apmae export --format analysis` on the real broker: typed Parquet that plain pandas, polars
and Hugging Face datasets read in a fresh interpreter that never imports apmae; the archival
export streams in row groups and imports back only into declared topics under the prefix."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from apmae.codec import encode_pattern
from apmae.topics import EMBEDDINGS, PATTERNS_MINE, EmbeddingRecord, PatternRecord
from services.bus import Bus, Output, read_range
from services.replay import ReplayConfig, import_parquet, replay

SIZE, DIM = 8, 16


def pattern(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = np.tril(rng.random((SIZE, SIZE), dtype=np.float32))
    return a / a.sum(axis=1, keepdims=True)


def publish(bus_cfg, n: int) -> tuple[list[PatternRecord], list[EmbeddingRecord]]:
    bus = Bus(bus_cfg, "export-test")
    bus.ensure_topics([PATTERNS_MINE, EMBEDDINGS])
    pats, embs = [], []
    for i in range(n):
        p = PatternRecord(id=f"p{i}", sample_id=f"s{i}", model="m", task=["identifiers", "strings"][i % 2],
                          layer=i % 3, head=i % 5, correct=[True, False, None][i % 3], size=SIZE, dtype="float32",
                          payload=encode_pattern(pattern(i), "float32"))
        e = EmbeddingRecord(id=f"e{i}", sample_id=f"s{i}", model="m", task=p.task, layer=p.layer, head=p.head,
                            correct=p.correct, checkpoint="c1", dim=DIM,
                            payload=np.arange(DIM, dtype="<f4").__add__(i).tobytes())
        bus.send(Output(PATTERNS_MINE, p, key=p.key))
        bus.send(Output(EMBEDDINGS, e, key=p.key))
        pats.append(p)
        embs.append(e)
    bus.producer.send(bus.name(PATTERNS_MINE), key=b"m/0/0", value=b"not an apmae message")
    bus.flush()
    bus.close()
    return pats, embs


READER = r'''
import json, sys
import pandas as pd
import polars as pl
import datasets
out = {}
d = sys.argv[1]
pdf = pd.read_parquet(d)
out["pandas_dtypes"] = {c: str(t) for c, t in pdf.dtypes.items()}
out["pandas_rows"] = len(pdf)
first = pdf.sort_values("id").iloc[0]
out["pandas_first"] = {"id": first["id"], "label": None if first["label"] is None else bool(first["label"]),
                       "vec": [float(x) for x in first[sys.argv[2]]]}
pldf = pl.read_parquet(d + "/*.parquet")
out["polars_schema"] = {c: str(t) for c, t in pldf.schema.items()}
out["polars_rows"] = pldf.height
ds = datasets.load_dataset("parquet", data_files=d + "/*.parquet", split="train")
out["datasets_features"] = {k: str(v) for k, v in ds.features.items()}
row = sorted(ds, key=lambda r: r["id"])[0]
out["datasets_first_vec"] = [float(x) for x in row[sys.argv[2]]]
out["apmae_imported"] = any(m == "apmae" or m.startswith(("apmae.", "services.")) for m in sys.modules)
print(json.dumps(out))
'''


def read_without_apmae(directory: Path, column: str, tmp_path: Path) -> dict:
    script = tmp_path / "reader.py"
    script.write_text(READER)
    env = {"PATH": "/usr/bin:/bin", "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_HOME": str(tmp_path / "hfh"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # -I: isolated mode (no cwd, no PYTHONPATH on sys.path), run from an empty directory
    res = subprocess.run([sys.executable, "-I", str(script), str(directory), column], cwd=tmp_path,
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_analysis_export_is_typed_parquet_that_pandas_polars_and_datasets_read(bus_cfg, tmp_path):
    n = 22
    pats, embs = publish(bus_cfg, n)
    out = tmp_path / "patterns"
    counts = replay(ReplayConfig(**{**vars(bus_cfg), "topic": "patterns.mine", "to_parquet": out,
                                    "format": "analysis", "row_group_rows": 4}), progress=False)
    assert counts["read"] == n + 1 and counts["to_parquet"] == n and counts["undecodable"] == 1
    (f,) = sorted(out.glob("*.parquet"))
    meta = pq.ParquetFile(f).metadata
    assert meta.num_row_groups == -(-n // 4)  # written 4 rows at a time: streamed, not buffered whole
    schema = pq.read_schema(f)
    assert str(schema.field("layer").type) == "int16" and str(schema.field("head").type) == "int16"
    ptype = schema.field("pattern").type
    assert pa.types.is_fixed_size_list(ptype) and ptype.list_size == SIZE * SIZE and ptype.value_type == pa.float32()
    assert str(schema.field("label").type) == "bool" and str(schema.field("task").type) == "string"
    assert "payload" not in schema.names and "timestamp" in schema.names

    got = read_without_apmae(out, "pattern", tmp_path)
    assert got["apmae_imported"] is False
    assert got["pandas_rows"] == got["polars_rows"] == n
    assert got["pandas_dtypes"]["layer"] == "int16" and got["pandas_dtypes"]["head"] == "int16"
    assert got["polars_schema"]["layer"] == "Int16" and got["polars_schema"]["pattern"] == f"Array(Float32, shape=({SIZE * SIZE},))"
    assert "float32" in got["datasets_features"]["pattern"] and got["datasets_features"]["layer"].find("int16") >= 0
    expect = pattern(0).ravel()  # p0 sorts first; float32 on the wire: exact after unpacking
    assert np.array_equal(np.array(got["pandas_first"]["vec"], dtype=np.float32), expect)
    assert np.array_equal(np.array(got["datasets_first_vec"], dtype=np.float32), expect)
    assert got["pandas_first"]["label"] is True

    eout = tmp_path / "embeddings"
    replay(ReplayConfig(**{**vars(bus_cfg), "topic": "embeddings", "to_parquet": eout, "format": "analysis"}),
           progress=False)
    got = read_without_apmae(eout, "embedding", tmp_path)
    assert got["pandas_rows"] == n and got["polars_schema"]["embedding"] == f"Array(Float32, shape=({DIM},))"
    assert got["datasets_first_vec"] == [float(x) for x in range(DIM)]


def test_archive_export_streams_and_imports_only_into_declared_topics(bus_cfg, tmp_path):
    n = 10
    publish(bus_cfg, n)
    out = tmp_path / "archive"
    counts = replay(ReplayConfig(**{**vars(bus_cfg), "topic": "patterns.mine", "to_parquet": out,
                                    "rows_per_file": 6, "row_group_rows": 4}), progress=False)
    files = sorted(out.glob("*.parquet"))
    assert counts["to_parquet"] == n + 1 and len(files) == 2  # 6 + 5 rows: files rotate
    assert [pq.ParquetFile(f).metadata.num_row_groups for f in files] == [2, 2]

    other = replace(bus_cfg, topic_prefix=f"t{uuid.uuid4().hex[:8]}.")
    res = import_parquet(other, out, progress=False, batch_rows=3)
    # every pattern comes back byte for byte; the undecodable row (schema "?") is not a
    # pattern record, so it is counted and not written into the patterns topic
    assert res["imported"] == n and res["wrong_schema"] == 1
    bus = Bus(other, "check")
    back = sorted(bytes(m.value) for m in read_range(bus, PATTERNS_MINE, decode_records=False))
    rows = [r for f in files for r in pq.read_table(f, columns=["schema", "value"]).to_pylist()]
    assert back == sorted(bytes(r["value"]) for r in rows if r["schema"] == "pattern")

    with pytest.raises(ValueError, match="not a declared topic"):
        import_parquet(other, out, to_topic="somewhere.else", progress=False)
    with pytest.raises(ValueError, match="not a declared topic"):  # a declared name under another prefix
        import_parquet(other, out, to_topic="zz.patterns.mine", progress=False)
    # rows of another record type are not written into a topic that holds patterns
    wrong = import_parquet(other, out, to_topic="embeddings", progress=False)
    assert wrong["imported"] == 0 and wrong["wrong_schema"] == n + 1
    analysis = tmp_path / "analysis"
    replay(ReplayConfig(**{**vars(bus_cfg), "topic": "patterns.mine", "to_parquet": analysis,
                           "format": "analysis"}), progress=False)
    with pytest.raises(ValueError, match="not an archive export"):
        import_parquet(other, analysis, progress=False)
