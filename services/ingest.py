"""``apmae ingest``: publish a corpus's source files to the ``files`` topic, once each.

Files are de-duplicated by content hash in Redis across runs (a Redis set per tenant
prefix), marked only after the broker acknowledged them, so a crash re-publishes at most
the last unacknowledged batch, with the same ids (consumers drop those). ``--follow``
keeps watching a directory and ingests files that are new or changed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
from prometheus_client import Counter
from tqdm import tqdm

from apmae.config import BusConfig, setting
from apmae.corpus import (
    CorpusStats,
    Limits,
    SourceFile,
    default_jdk_corpus,
    open_corpus,
    read_directory,
)
from apmae.topics import FILES, FileRecord
from services.bus import Bus, Output

log = logging.getLogger("apmae.ingest")
FILES_TOTAL = Counter("apmae_ingest_files_total", "Corpus files seen by ingest", ["result"])
SKIPPED_TOTAL = Counter("apmae_ingest_skipped_total", "Corpus files skipped", ["reason"])
BYTES_TOTAL = Counter("apmae_ingest_bytes_total", "UTF-8 bytes of source published")
CHARS_TOTAL = Counter("apmae_ingest_characters_total", "Characters (code points) of source published")


@dataclass(frozen=True)
class IngestConfig(BusConfig):
    corpus: str = setting("", "Directory, zip/jar/tar, Heap Parquet shard(s) or JSONL (default: the JDK's src.zip)")
    limit: int = setting(0, "Stop after publishing this many new files (0 = no limit)")
    follow: bool = setting(False, "Keep watching a directory corpus and ingest new or changed files")
    follow_interval_s: float = setting(5.0, "Seconds between directory scans in --follow mode")
    max_file_bytes: int = setting(1 << 20, "Skip source files larger than this")
    max_archive_bytes: int = setting(4 << 30, "Stop reading an archive after this many expanded bytes")
    drop_duplicates_of: str = setting("stackv2", "Drop Heap rows flagged as duplicates of this corpus ('' keeps all)")
    dedupe: bool = setting(True, "Skip files whose content hash was already ingested (Redis)")
    batch: int = setting(128, "Files per flush")


def corpus_path(cfg: IngestConfig) -> Path:
    if cfg.corpus:
        return Path(cfg.corpus)
    jdk = default_jdk_corpus()
    if jdk is None:
        raise SystemExit("no --corpus given and no JDK src.zip found (set JAVA_HOME or pass --corpus)")
    return jdk


class Ingest:
    def __init__(self, cfg: IngestConfig, stop: threading.Event | None = None):
        self.cfg = cfg
        self.bus = Bus(cfg, "ingest")
        self.redis = redis.Redis.from_url(cfg.redis_url) if cfg.dedupe else None
        self.seen_key = f"apmae:ingest:seen:{cfg.topic_prefix}"
        self.stats = CorpusStats()
        self.published = 0
        self.duplicates = 0
        self.stop = stop or threading.Event()
        self.limits = Limits(max_file_bytes=cfg.max_file_bytes, max_archive_bytes=cfg.max_archive_bytes)

    def _publish(self, batch: list[SourceFile]) -> None:
        ids = [f.id for f in batch]
        if self.redis is not None:
            flags = self.redis.smismember(self.seen_key, ids)
            fresh = [f for f, s in zip(batch, flags, strict=True) if not s]
        else:
            fresh = batch
        unique = {f.id: f for f in fresh}  # the same content twice in one batch
        self.duplicates += len(batch) - len(unique)
        FILES_TOTAL.labels("duplicate").inc(len(batch) - len(unique))
        for f in unique.values():
            rec = FileRecord(id=f.id, source=f.source, path=f.path, content=f.content, license=f.license, repo=f.repo)
            self.bus.send(Output(FILES, rec))
            BYTES_TOTAL.inc(len(f.content.encode("utf-8", "surrogatepass")))
            CHARS_TOTAL.inc(len(f.content))
        self.bus.flush()
        if self.redis is not None and unique:
            self.redis.sadd(self.seen_key, *unique)  # only after the broker acknowledged them
        self.published += len(unique)
        FILES_TOTAL.labels("published").inc(len(unique))

    def ingest(self, files: Iterable[SourceFile], progress: bool = True) -> int:
        batch: list[SourceFile] = []
        before = self.published
        bar = tqdm(desc="ingest", unit="file", disable=not progress)
        for f in files:
            if self.stop.is_set() or (self.cfg.limit and self.published + len(batch) >= self.cfg.limit):
                break
            batch.append(f)
            if len(batch) >= self.cfg.batch:
                self._publish(batch)
                bar.update(len(batch))
                batch = []
        if batch:
            self._publish(batch)
            bar.update(len(batch))
        bar.close()
        return self.published - before

    def run(self, progress: bool = True) -> dict:
        self.bus.ensure_topics([FILES])
        path = corpus_path(self.cfg)
        skipped_before = dict(self.stats.skipped)
        self.ingest(open_corpus(path, self.stats, self.limits, self.cfg.drop_duplicates_of), progress)
        if self.cfg.follow:
            if not path.is_dir():
                raise SystemExit("--follow needs a directory corpus")
            self.follow(path, progress)
        for reason, n in self.stats.skipped.items():
            SKIPPED_TOTAL.labels(reason).inc(n - skipped_before.get(reason, 0))
        self.bus.close()
        return self.summary()

    def _changed(self, root: Path, known: dict[str, tuple[float, int]]) -> Iterator[SourceFile]:
        for f in read_directory(root, self.stats, self.limits):
            p = root / f.path
            try:
                st = p.stat()
            except OSError:
                continue
            sig = (st.st_mtime, st.st_size)
            if known.get(f.path) != sig:
                known[f.path] = sig
                yield f

    def follow(self, root: Path, progress: bool) -> None:
        """Watch ``root``: every interval, ingest files that are new or whose content changed."""
        known: dict[str, tuple[float, int]] = {}
        list(self._changed(root, known))  # what the first pass already covered
        log.info("following %s every %.1f s", root, self.cfg.follow_interval_s)
        while not self.stop.wait(self.cfg.follow_interval_s):
            n = self.ingest(self._changed(root, known), progress=False)
            if n:
                log.info("ingested %d new or changed files", n)

    def summary(self) -> dict:
        return {"published": self.published, "duplicates": self.duplicates, **self.stats.as_dict()}
