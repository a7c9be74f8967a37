"""Corpus readers: stream file records out of a directory, a zip/tar archive, The Heap's
Parquet shards or JSON Lines, with bounded memory.

Every reader yields :class:`SourceFile` (``id`` = first 32 hex of the SHA-256 of the UTF-8
content, so the same file found twice has the same id) and counts what it skipped in
:class:`CorpusStats` (unreadable, not UTF-8, oversized, duplicate of the target model's
training data, archive expansion over the limit). Nothing a corpus contains is fatal.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


class CorpusError(ValueError):
    """The corpus itself cannot be read (not an archive, a truncated one, a broken Parquet
    file). Problems with single members are counted in CorpusStats instead."""


@dataclass(frozen=True)
class SourceFile:
    id: str
    source: str
    path: str
    content: str
    license: str | None = None
    repo: str | None = None


@dataclass
class CorpusStats:
    files: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"files": self.files, "bytes": self.bytes, "skipped": dict(self.skipped)}


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int = 1 << 20
    max_archive_bytes: int = 4 << 30  # total expansion of one archive (zip-bomb guard)
    suffixes: tuple[str, ...] = (".java",)


def content_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _decode(raw: bytes, stats: CorpusStats) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.skipped["not utf-8"] += 1
        return None


def _record(text: str, source: str, path: str, stats: CorpusStats, **kw) -> SourceFile:
    stats.files += 1
    stats.bytes += len(text)
    return SourceFile(content_id(text), source, path, text, **kw)


def _walk(root: Path) -> Iterator[Path]:
    """Every entry below ``root`` in a stable order; symlinked directories are not entered
    (a link to / or a cycle would make the walk unbounded)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            yield Path(dirpath) / name


def read_regular_file(path: Path, root: Path, limit: int) -> bytes | str:
    """At most ``limit`` + 1 bytes of ``path``, or the reason it is skipped.

    Only regular files inside ``root`` (its resolved form) are read: a symlink to /dev/zero
    was read until memory ran out, one to any readable file leaked it into the corpus, and
    opening a FIFO blocked forever. The type is checked on the opened descriptor (no window
    between check and read), and O_NONBLOCK makes opening a FIFO return at once."""
    if path.is_symlink() and not path.resolve().is_relative_to(root):
        return "symlink out of the corpus root"
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not a regular file"
        if os.fstat(fd).st_size > limit:
            return "oversized"
        raw = f.read(limit + 1)  # a file growing while it is read stays bounded too
    return "oversized" if len(raw) > limit else raw


def read_directory(root: Path, stats: CorpusStats, limits: Limits = Limits()) -> Iterator[SourceFile]:
    real = Path(root).resolve()
    for path in _walk(real):
        if path.suffix not in limits.suffixes:
            continue
        try:
            raw = read_regular_file(path, real, limits.max_file_bytes)
        except OSError:
            stats.skipped["unreadable"] += 1
            continue
        if isinstance(raw, str):
            stats.skipped[raw] += 1
            continue
        text = _decode(raw, stats)
        if text is not None:
            yield _record(text, str(root), str(path.relative_to(real)), stats)


def _read_members(archive: Path, members: Iterator[tuple[str, int, Callable[[], IO[bytes] | None]]],
                  stats: CorpusStats, limits: Limits) -> Iterator[SourceFile]:
    """The archive readers' shared loop over (name, declared size, opener) members: size and
    expansion limits (zip-bomb guard), reads bounded whatever the declared size says."""
    expanded = 0
    for name, size, opener in members:
        if not name.endswith(limits.suffixes):
            continue
        if size > limits.max_file_bytes:
            stats.skipped["oversized"] += 1
            continue
        if expanded + size > limits.max_archive_bytes:
            stats.skipped["archive expansion limit"] += 1
            return
        try:
            f = opener()
            if f is None:
                stats.skipped["unreadable"] += 1
                continue
            with f:
                raw = f.read(limits.max_file_bytes + 1)  # never trust the declared size
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, NotImplementedError):
            stats.skipped["unreadable"] += 1
            continue
        if len(raw) > limits.max_file_bytes:
            stats.skipped["oversized"] += 1
            continue
        expanded += len(raw)
        text = _decode(raw, stats)
        if text is not None:
            yield _record(text, str(archive), name, stats)


def read_zip(archive: Path, stats: CorpusStats, limits: Limits = Limits()) -> Iterator[SourceFile]:
    with zipfile.ZipFile(archive) as zf:
        members = ((i.filename, i.file_size, lambda i=i: zf.open(i)) for i in zf.infolist() if not i.is_dir())
        yield from _read_members(archive, members, stats, limits)


def read_tar(archive: Path, stats: CorpusStats, limits: Limits = Limits()) -> Iterator[SourceFile]:
    with tarfile.open(archive) as tf:
        members = ((m.name, m.size, lambda m=m: tf.extractfile(m)) for m in tf if m.isfile())
        yield from _read_members(archive, members, stats, limits)


def read_parquet(path: Path, stats: CorpusStats, limits: Limits = Limits(),
                 drop_duplicates_of: str = "stackv2") -> Iterator[SourceFile]:
    """The Heap's shards: ``content`` plus ``file_path``, ``repo_name``, ``repo_license`` and
    boolean duplicate flags (``exact_duplicates_<corpus>``, ``near_duplicates_<corpus>``).
    Rows flagged as duplicates of ``drop_duplicates_of`` (the target model's training data;
    ``stackv2`` for StarCoder2) are dropped unless it is empty."""
    import pyarrow.parquet as pq

    files = sorted(Path(path).glob("*.parquet")) if Path(path).is_dir() else [Path(path)]
    for f in files:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        if "content" not in names:
            stats.skipped["parquet without content column"] += 1
            continue
        flags = [c for c in names if drop_duplicates_of and c.endswith(f"duplicates_{drop_duplicates_of}")]
        cols = ["content"] + [c for c in ("file_path", "repo_name", "repo_license") if c in names] + flags
        for batch in pf.iter_batches(batch_size=512, columns=cols):
            for row in batch.to_pylist():
                if any(row.get(c) for c in flags):
                    stats.skipped[f"duplicate of {drop_duplicates_of}"] += 1
                    continue
                text = row["content"]
                if not isinstance(text, str):
                    stats.skipped["not utf-8"] += 1
                    continue
                if len(text.encode("utf-8")) > limits.max_file_bytes:
                    stats.skipped["oversized"] += 1
                    continue
                yield _record(text, str(f), row.get("file_path") or "", stats,
                              license=row.get("repo_license"), repo=row.get("repo_name"))


def _lines(f: IO[bytes], limit: int) -> Iterator[bytes | None]:
    """The lines of ``f``, each read at most ``limit`` + 1 bytes at a time: a line longer than
    ``limit`` is skipped in bounded chunks and yielded as None (one 10 GB line must not be
    read into memory to find out it is too long)."""
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit:
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = f.readline(1 << 20)
        yield None


def read_jsonl(path: Path, stats: CorpusStats, limits: Limits = Limits()) -> Iterator[SourceFile]:
    with open(path, "rb") as f:
        # JSON escapes can make a line up to ~4x the source it carries (e.g. "\u00e9" for é)
        for lineno, line in enumerate(_lines(f, 4 * limits.max_file_bytes), 1):
            if line is None:
                stats.skipped["oversized"] += 1
                continue
            try:
                obj = json.loads(line)
                text = obj["content"]
                if not isinstance(text, str):
                    raise TypeError("content is not a string")
                if not all(isinstance(obj.get(k), str | None) for k in ("path", "license", "repo")):
                    raise TypeError("path, license and repo must be strings")
            except RecursionError:  # a line nested deeper than the parser's stack
                stats.skipped["json nested too deeply"] += 1
                continue
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):  # ValueError: not JSON, a 5000-digit int
                stats.skipped["malformed json line"] += 1
                continue
            if len(text.encode("utf-8")) > limits.max_file_bytes:
                stats.skipped["oversized"] += 1
                continue
            yield _record(text, str(path), obj.get("path", f"line {lineno}"), stats,
                          license=obj.get("license"), repo=obj.get("repo"))


def open_corpus(path: str | Path, stats: CorpusStats, limits: Limits = Limits(),
                drop_duplicates_of: str = "stackv2") -> Iterator[SourceFile]:
    """Pick the reader from what ``path`` is; a corpus that cannot be read raises CorpusError
    (when iterated) naming the file and the reason."""
    return _guarded(path, _reader(path, stats, limits, drop_duplicates_of))


def _guarded(path: str | Path, files: Iterator[SourceFile]) -> Iterator[SourceFile]:
    import zlib

    from pyarrow import ArrowException

    try:
        yield from files
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error, ArrowException,
            OSError) as e:
        raise CorpusError(f"{path}: cannot read the corpus: {type(e).__name__}: {e}") from e


def _reader(path: str | Path, stats: CorpusStats, limits: Limits, drop_duplicates_of: str) -> Iterator[SourceFile]:
    p = Path(path)
    if p.exists() and not (p.is_dir() or p.is_file()):  # a FIFO or a device would block or never end
        raise ValueError(f"{path}: not a regular file or directory")
    if p.is_dir():
        if any(p.glob("*.parquet")):
            return read_parquet(p, stats, limits, drop_duplicates_of)
        return read_directory(p, stats, limits)
    name = p.name.lower()
    if name.endswith((".zip", ".jar")):
        return read_zip(p, stats, limits)
    if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        return read_tar(p, stats, limits)
    if name.endswith(".parquet"):
        return read_parquet(p, stats, limits, drop_duplicates_of)
    if name.endswith((".jsonl", ".json")):
        return read_jsonl(p, stats, limits)
    raise ValueError(f"{path}: not a directory, zip/jar, tar, parquet or jsonl corpus")


def default_jdk_corpus() -> Path | None:
    """``$JAVA_HOME/lib/src.zip`` (every JDK ships it) or a common install location."""
    import os

    cands = []
    if os.environ.get("JAVA_HOME"):
        cands.append(Path(os.environ["JAVA_HOME"]) / "lib" / "src.zip")
    cands += sorted(Path("/usr/lib/jvm").glob("*/lib/src.zip")) + sorted(Path("/usr/lib/jvm").glob("*/src.zip"))
    return next((c for c in cands if c.exists()), None)
