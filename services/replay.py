"""Replay topics for offline experiments: topic -> topic, topic -> Parquet, Parquet -> topic.

A replay reads a fixed range (from an offset or a timestamp to the end as of the start of
the replay, or to ``end_ms``) with no consumer group, so it never disturbs live services.
Messages are copied byte for byte: the ids inside them are unchanged, so downstream
de-duplication still works on a replayed stream. Parquet rows keep the Kafka metadata
(topic, partition, offset, timestamp, key), the record's schema and id, its JSON header and
the original value bytes, so ``import`` restores exactly what was exported.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from apmae.config import BusConfig, setting
from apmae.messages import InvalidMessage, _split
from apmae.topics import topic as topic_by_name
from services.bus import Bus

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


def replay(cfg: ReplayConfig, progress: bool = True) -> dict[str, int]:
    """Copy a range of ``cfg.topic`` to ``cfg.to_topic`` and/or Parquet. Returns counts."""
    if not cfg.to_topic and not cfg.to_parquet:
        raise ValueError("say where to replay to: --to-topic and/or --to-parquet")
    bus = Bus(cfg, "replay")
    counts = {"read": 0, "to_topic": 0, "to_parquet": 0, "files": 0}
    rows: list[dict] = []
    writer_dir = Path(cfg.to_parquet) if cfg.to_parquet else None
    if writer_dir:
        writer_dir.mkdir(parents=True, exist_ok=True)

    def flush_rows() -> None:
        if rows and writer_dir:
            path = writer_dir / f"{cfg.topic}-{int(time.time() * 1000)}-{counts['files']:05d}.parquet"
            pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), path, compression="zstd")
            counts["to_parquet"] += len(rows)
            counts["files"] += 1
            rows.clear()

    for r in tqdm(_raw_range(bus, cfg), desc=f"replay {cfg.topic}", unit="msg", disable=not progress):
        counts["read"] += 1
        if cfg.to_topic:
            bus.producer.send(cfg.to_topic, key=r.key, value=r.value, headers=list(r.headers or []),
                              timestamp_ms=r.timestamp)
            counts["to_topic"] += 1
        if writer_dir:
            rows.append(_row(r))
            if len(rows) >= cfg.rows_per_file:
                flush_rows()
    flush_rows()
    bus.close()
    return counts


def import_parquet(cfg: BusConfig, path: Path, to_topic: str | None = None, progress: bool = True) -> dict[str, int]:
    """Produce every row of the Parquet file(s) under ``path`` back to its topic (or ``to_topic``)."""
    bus = Bus(cfg, "import")
    files = sorted(Path(path).glob("*.parquet")) if Path(path).is_dir() else [Path(path)]
    n = 0
    for f in files:
        table = pq.read_table(f)
        for row in tqdm(table.to_pylist(), desc=f"import {f.name}", unit="msg", disable=not progress):
            target = to_topic or row["topic"]
            headers = [("id", row["id"].encode())] if row["id"] else []
            bus.producer.send(target, key=row["key"], value=row["value"], headers=headers,
                              timestamp_ms=row["timestamp_ms"])
            n += 1
    bus.close()
    return {"files": len(files), "imported": n}
