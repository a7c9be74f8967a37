"""Replay topics for offline experiments: topic -> topic, topic -> Parquet, Parquet -> topic.

A replay reads a fixed range (from an offset or a timestamp to the end as of the start of
the replay, or to ``end_ms``) with no consumer group, so it never disturbs live services.
Messages are copied byte for byte: the ids inside them are unchanged, so downstream
de-duplication still works on a replayed stream. Parquet rows keep the Kafka metadata
(topic, partition, offset, timestamp, key), the record's schema and id, its JSON header and
the original value bytes, so ``import`` restores exactly what was exported.

``--format analysis`` writes typed Parquet for people instead: one column per record field
(``layer``/``head`` int16, ``label`` = whether the LLM was right), ``pattern`` the unpacked
``size x size`` attention matrix as a fixed-size list of float32, ``embedding`` a fixed-size
list of float32, Kafka metadata typed; readable by pandas, polars, DuckDB or Hugging Face
``datasets`` without apmae. Both formats stream: rows go out in row groups through
``pyarrow.parquet.ParquetWriter`` (at most one row group in memory), and ``import`` reads
record batches, never a whole file.
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from apmae.codec import decode_pattern
from apmae.config import BusConfig, setting
from apmae.messages import InvalidMessage, Record, _split
from apmae.topics import BY_NAME, EmbeddingRecord, PatternRecord, Topic
from apmae.topics import topic as topic_by_name
from services.bus import Bus, Message

PARQUET_SCHEMA = pa.schema([
    ("topic", pa.string()), ("partition", pa.int32()), ("offset", pa.int64()), ("timestamp_ms", pa.int64()),
    ("key", pa.binary()), ("schema", pa.string()), ("id", pa.string()), ("header", pa.string()),
    ("value", pa.binary()),
])


@dataclass(frozen=True)
class ReplayConfig(BusConfig):
    topic: str = setting("samples", "Topic to read (logical name, without prefix)")
    from_offset: int | None = setting(None, "Start at this offset in every partition (default: beginning)")
    from_time: str | None = setting(None, "Start at this time (ISO 8601 or epoch milliseconds)")
    to_time: str | None = setting(None, "Stop after this time (ISO 8601 or epoch milliseconds)")
    to_topic: str | None = setting(None, "Copy into this physical topic name")
    to_parquet: Path | None = setting(None, "Write Parquet file(s) into this directory")
    rows_per_file: int = setting(50_000, "Parquet rows per file")
    format: str = setting("archive", "Parquet layout: archive (envelope bytes; what import reads back) or "
                                     "analysis (typed columns, unpacked patterns, for pandas/polars/datasets)")
    row_group_rows: int = setting(0, "Rows per Parquet row group (0: about 64 MB of column data per group)")


def parse_time(t: str | None) -> int | None:
    """ISO 8601 or epoch-milliseconds string -> epoch milliseconds."""
    if t is None:
        return None
    if t.strip().lstrip("-").isdigit():
        return int(t)
    from datetime import datetime

    dt = datetime.fromisoformat(t)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _row(r) -> dict:
    try:
        head, _ = _split(r.value)
        schema, mid, header = head.get("schema", "?"), str(head.get("id", "")), json.dumps(head)
    except InvalidMessage:
        schema, mid, header = "?", "", "{}"
    return {"topic": r.topic, "partition": r.partition, "offset": r.offset, "timestamp_ms": r.timestamp,
            "key": r.key, "schema": schema, "id": mid, "header": header, "value": r.value}


def _raw_range(bus: Bus, cfg: ReplayConfig) -> Iterator:
    from services.bus import read_range

    return read_range(bus, topic_by_name(cfg.topic), start_offset=cfg.from_offset,
                      start_ms=parse_time(cfg.from_time), end_ms=parse_time(cfg.to_time), decode_records=False)


class RowGroupWriter:
    """Parquet files of at most ``rows_per_file`` rows, written one row group at a time.

    ``add(row)`` buffers one row; every ``row_group_rows`` rows the buffer becomes a row group
    (``to_table(rows)`` builds it) and is freed, so memory holds one row group, not a file.
    ``new_file()`` closes the current file (the next row starts another)."""

    def __init__(self, out_dir: Path, stem: str, rows_per_file: int, row_group_rows: int,
                 to_table: Any, counts: dict[str, int]):
        self.out_dir, self.stem = out_dir, stem
        self.rows_per_file, self.row_group_rows = rows_per_file, row_group_rows
        self.to_table, self.counts = to_table, counts
        self.rows: list[Any] = []
        self.writer: pq.ParquetWriter | None = None
        self.in_file = 0
        self.t0 = int(time.time() * 1000)

    def add(self, row: Any) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.row_group_rows or self.in_file + len(self.rows) >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        table = self.to_table(self.rows)
        if self.writer is None:
            path = self.out_dir / f"{self.stem}-{self.t0}-{self.counts['files']:05d}.parquet"
            self.writer = pq.ParquetWriter(path, table.schema, compression="zstd")
            self.counts["files"] += 1
        self.writer.write_table(table, row_group_size=len(self.rows))
        self.counts["to_parquet"] += len(self.rows)
        self.counts["row_groups"] = self.counts.get("row_groups", 0) + 1
        self.in_file += len(self.rows)
        self.rows = []
        if self.in_file >= self.rows_per_file:
            self.new_file()

    def new_file(self) -> None:
        if self.rows:
            self.flush()
        if self.writer is not None:
            self.writer.close()
        self.writer, self.in_file = None, 0

    def close(self) -> None:
        self.flush()
        self.new_file()


def replay(cfg: ReplayConfig, progress: bool = True) -> dict[str, int]:
    """Copy a range of ``cfg.topic`` to ``cfg.to_topic`` and/or Parquet. Returns counts."""
    if not cfg.to_topic and not cfg.to_parquet:
        raise ValueError("say where to replay to: --to-topic and/or --to-parquet")
    if cfg.format not in ("archive", "analysis"):
        raise ValueError(f"--format {cfg.format!r}: choose archive or analysis")
    if cfg.format == "analysis":
        if cfg.to_topic:
            raise ValueError("--format analysis writes Parquet only (replay to a topic copies envelopes)")
        return export_analysis(cfg, progress)
    bus = Bus(cfg, "replay")
    counts = {"read": 0, "to_topic": 0, "to_parquet": 0, "files": 0}
    writer: RowGroupWriter | None = None
    if cfg.to_parquet:
        Path(cfg.to_parquet).mkdir(parents=True, exist_ok=True)
        writer = RowGroupWriter(Path(cfg.to_parquet), cfg.topic, cfg.rows_per_file, cfg.row_group_rows or 4096,
                                lambda rows: pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), counts)
    for r in tqdm(_raw_range(bus, cfg), desc=f"replay {cfg.topic}", unit="msg", disable=not progress):
        counts["read"] += 1
        if cfg.to_topic:
            bus.producer.send(cfg.to_topic, key=r.key, value=r.value, headers=list(r.headers or []),
                              timestamp_ms=r.timestamp)
            counts["to_topic"] += 1
        if writer:
            writer.add(_row(r))
    if writer:
        writer.close()
    bus.close()
    return counts


# -- analysis export -----------------------------------------------------------------------
_SMALL_INTS = {"layer": pa.int16(), "head": pa.int16(), "size": pa.int16(), "dim": pa.int32(),
               "partition": pa.int32()}
_DROP = {"payload", "dtype"}  # the bulk payload becomes a typed column; its wire dtype is irrelevant then


def _field_type(name: str, hint: Any) -> pa.DataType:
    if name in _SMALL_INTS:
        return _SMALL_INTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = args[0]
    return {str: pa.string(), int: pa.int64(), bool: pa.bool_(), float: pa.float64(), bytes: pa.binary()}.get(
        base, pa.string())


def analysis_columns(rec_type: type[Record]) -> list[tuple[str, str, pa.DataType]]:
    """(column, record field, arrow type) for a record type; ``correct`` is named ``label``."""
    hints = typing.get_type_hints(rec_type)
    out = []
    for f in dataclasses.fields(rec_type):
        if f.name in _DROP:
            continue
        col = "label" if f.name == "correct" else f.name
        out.append((col, f.name, _field_type(f.name, hints[f.name])))
    return out


def _vector(rec: Record) -> tuple[str, np.ndarray] | None:
    """The record's payload as a float32 vector column: the unpacked pattern or the embedding."""
    if isinstance(rec, PatternRecord):
        return "pattern", decode_pattern(bytes(rec.payload), rec.size, rec.dtype).astype(np.float32).ravel()
    if isinstance(rec, EmbeddingRecord):
        v = np.frombuffer(bytes(rec.payload), dtype="<f4")
        if v.size != rec.dim:
            raise InvalidMessage(f"embedding payload has {v.size} floats, header says dim={rec.dim}")
        return "embedding", v.astype(np.float32)
    return None


def analysis_table(t: Topic, rows: list[tuple[Any, Record, np.ndarray | None]], vec_name: str | None) -> pa.Table:
    """One row group: Kafka metadata, the record's fields, and its vector as a fixed-size list."""
    cols = analysis_columns(t.record)
    arrays: dict[str, pa.Array] = {
        "topic": pa.array([t.name] * len(rows), pa.string()),
        "partition": pa.array([m.partition for m, _, _ in rows], pa.int32()),
        "offset": pa.array([m.offset for m, _, _ in rows], pa.int64()),
        "timestamp": pa.array([m.timestamp for m, _, _ in rows], pa.timestamp("ms", tz="UTC")),
    }
    for col, field_name, typ in cols:
        values = [getattr(r, field_name) for _, r, _ in rows]
        if typ == pa.binary():
            values = [bytes(v) for v in values]
        arrays[col] = pa.array(values, typ)
    if vec_name is not None:
        mat = np.stack([v for _, _, v in rows]).astype(np.float32, copy=False)
        arrays[vec_name] = pa.FixedSizeListArray.from_arrays(pa.array(mat.ravel(), pa.float32()), mat.shape[1])
    return pa.table(arrays)


def export_analysis(cfg: ReplayConfig, progress: bool = True) -> dict[str, int]:
    """Typed Parquet of ``cfg.topic`` (see the module docstring). A new file starts whenever the
    vector width changes (a fixed-size list has one width per file)."""
    from services.bus import read_range

    t = topic_by_name(cfg.topic)
    out_dir = Path(cfg.to_parquet)
    out_dir.mkdir(parents=True, exist_ok=True)
    bus = Bus(cfg, "export")
    counts = {"read": 0, "to_parquet": 0, "files": 0, "row_groups": 0, "undecodable": 0}
    state: dict[str, Any] = {"width": None, "vec": None}
    writer: RowGroupWriter | None = None
    rng = read_range(bus, t, start_offset=cfg.from_offset, start_ms=parse_time(cfg.from_time),
                     end_ms=parse_time(cfg.to_time))
    for m in tqdm(rng, desc=f"export {cfg.topic}", unit="msg", disable=not progress):
        counts["read"] += 1
        if not isinstance(m, Message):
            counts["undecodable"] += 1
            continue
        try:
            vec = _vector(m.record)
        except ValueError:  # BadPattern and InvalidMessage are ValueErrors
            counts["undecodable"] += 1
            continue
        name, v = (vec if vec is not None else (None, None))
        width = None if v is None else v.size
        if writer is None or width != state["width"]:
            if writer is not None:
                writer.close()
            state.update(width=width, vec=name)
            row_bytes = 256 + (0 if width is None else 4 * width)
            group = cfg.row_group_rows or max(1, min(100_000, (64 << 20) // row_bytes))
            writer = RowGroupWriter(out_dir, f"{t.name}.analysis", cfg.rows_per_file, group,
                                    lambda rows: analysis_table(t, rows, state["vec"]), counts)
        writer.add((m, m.record, v))
    if writer is not None:
        writer.close()
    bus.close()
    return counts


def logical_topic(physical: str) -> Topic | None:
    """The declared topic an exported row came from: its name after whatever prefix the
    exporting deployment used (``t1a2b.patterns.mine`` -> ``patterns.mine``)."""
    for name in sorted(BY_NAME, key=len, reverse=True):
        if physical == name or physical.endswith("." + name):
            return BY_NAME[name]
    return None


def import_target(cfg: BusConfig, row_topic: str, to_topic: str | None) -> Topic:
    """Where an archived row may go: only a declared topic, under ``cfg.topic_prefix``.
    ``to_topic`` is a declared name, or that name with this prefix; anything else is refused."""
    if to_topic:
        name = to_topic.removeprefix(cfg.topic_prefix) if cfg.topic_prefix else to_topic
        if name not in BY_NAME:
            raise ValueError(f"--to-topic {to_topic!r} is not a declared topic under the prefix "
                             f"{cfg.topic_prefix!r} (declared: {', '.join(sorted(BY_NAME))})")
        return BY_NAME[name]
    t = logical_topic(row_topic)
    if t is None:
        raise ValueError(f"exported rows of topic {row_topic!r} belong to no declared topic; pass --to-topic")
    return t


def import_parquet(cfg: BusConfig, path: Path, to_topic: str | None = None, progress: bool = True,
                   batch_rows: int = 1024) -> dict[str, int]:
    """Produce every row of the archive Parquet file(s) under ``path`` back into the declared
    topic it came from (or ``to_topic``), under ``cfg.topic_prefix``. Files are read in record
    batches of ``batch_rows``. Every target is checked before anything is produced: a row of an
    undeclared topic refuses the whole import; a row whose schema is not the target topic's
    record is skipped and counted (``wrong_schema``)."""
    files = sorted(Path(path).glob("*.parquet")) if Path(path).is_dir() else [Path(path)]
    for f in files:  # validate first: only the topic column is read
        if "value" not in pq.read_schema(f).names:
            raise ValueError(f"{f} is not an archive export (an analysis export cannot be imported)")
        for name in pq.read_table(f, columns=["topic"]).column("topic").unique().to_pylist():
            import_target(cfg, name, to_topic)
    bus = Bus(cfg, "import")
    n, wrong = 0, 0
    for f in files:
        pf = pq.ParquetFile(f)
        bar = tqdm(total=pf.metadata.num_rows, desc=f"import {f.name}", unit="msg", disable=not progress)
        for batch in pf.iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                t = import_target(cfg, row["topic"], to_topic)
                if row["schema"] != t.record.SCHEMA:
                    wrong += 1
                    continue
                headers = [("id", row["id"].encode())] if row["id"] else []
                bus.producer.send(bus.name(t), key=row["key"], value=row["value"], headers=headers,
                                  timestamp_ms=row["timestamp_ms"])
                n += 1
            bar.update(batch.num_rows)
        bar.close()
    bus.close()
    return {"files": len(files), "imported": n, "wrong_schema": wrong}
