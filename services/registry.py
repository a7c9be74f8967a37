"""The artifact store (files under one root) and the model registry (Redis hashes).

Every artifact is written with its SHA-256, which the registry records; a pickled artifact
(a fitted UMAP/HDBSCAN, a CatBoost model) is unpickled only after the bytes read back hash
to the recorded value, and the store refuses any path that resolves outside its root.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class FileDigests:
    """:func:`sha256_file`, hashed again only when the file changed (its device, inode, size,
    mtime or ctime; ctime moves on any write or utime, and cannot be set back): a service that
    checks its checkpoint every few seconds hashed it in full each time, 400 MB for the paper
    variant of AP-MAE. A change of checkpoint is still verified in full by its loader."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[tuple[int, ...], str]] = {}

    def __call__(self, path: Path) -> str:
        st = path.stat()
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        known = self._known.get(str(path))
        if known is None or known[0] != stamp:
            known = self._known[str(path)] = (stamp, sha256_file(path))
        return known[1]


def safe_name(name: str) -> str:
    """A model name as a file name (and a relative URL): 'local:smollm2' -> 'local_smollm2'."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class UnsafePath(ValueError):
    pass


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def path(self, rel: str) -> Path:
        p = (self.root / rel).resolve()
        if self.root != p and self.root not in p.parents:
            raise UnsafePath(f"{rel!r} resolves outside the artifact store {self.root}")
        return p

    def write(self, rel: str, data: bytes) -> str:
        p = self.path(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(p)
        return hashlib.sha256(data).hexdigest()

    def read(self, rel: str, sha256: str | None = None) -> bytes:
        data = self.path(rel).read_bytes()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"artifact {rel} does not match its recorded SHA-256")
        return data


def apmae_key(prefix: str, name: str) -> str:
    """Registry key of the AP-MAE run ``name`` under a topic prefix: without the prefix, tenant
    B's encoder embedded with (and its trainer overwrote) tenant A's checkpoint."""
    return Registry(None, prefix).key("apmae", name)


class RegistryError(LookupError):
    """A name the registry does not hold, or an artifact that does not match its entry."""


class Registry:
    """Redis hashes: ``apmae:registry:<kind>:<prefix><name>`` -> {path, sha256, version, ...}.

    The one way in and out for every artifact pointer: AP-MAE checkpoints (kind ``apmae``,
    written by the trainer, followed by the encoder), per-head cluster fits (``cluster``) and
    per-task classifiers (``classifier``). The key layout lives in :meth:`key` only.

    * :meth:`put` replaces the entry as a whole (a field of an older version never lingers)
      and keeps the last ``keep`` entries in a history, in one transaction;
    * :meth:`get` is the current entry or None, :meth:`latest` the same or a clear error;
    * :meth:`history` lists earlier entries, newest first (what a checkpoint replaced);
    * :meth:`verify` reads an entry's artifact from the store and checks its SHA-256: the one
      place a pointer is turned into trusted bytes (pickles are loaded only after it)."""

    def __init__(self, redis_client: Any, prefix: str = "", keep: int = 20):
        self.r, self.prefix, self.keep = redis_client, prefix, keep

    def key(self, kind: str, name: str) -> str:
        return f"apmae:registry:{kind}:{self.prefix}{name}"

    def _index(self, kind: str) -> str:
        return f"apmae:registry:{kind}:{self.prefix}*index"

    def put(self, kind: str, name: str, **fields: Any) -> None:
        mapping = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in fields.items()}
        key = self.key(kind, name)
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(key, mapping=mapping)
        pipe.lpush(key + ":history", json.dumps(mapping, sort_keys=True))
        pipe.ltrim(key + ":history", 0, self.keep - 1)
        pipe.sadd(self._index(kind), name)
        pipe.execute()

    def get(self, kind: str, name: str) -> dict[str, str] | None:
        h = self.r.hgetall(self.key(kind, name))
        return {k.decode(): v.decode() for k, v in h.items()} if h else None

    def latest(self, kind: str, name: str) -> dict[str, str]:
        entry = self.get(kind, name)
        if entry is None:
            raise RegistryError(f"the registry holds no {kind} named {name!r} under topic prefix {self.prefix!r}")
        return entry

    def history(self, kind: str, name: str) -> list[dict[str, str]]:
        """Every kept entry of ``name``, newest (the current one) first."""
        return [json.loads(raw) for raw in self.r.lrange(self.key(kind, name) + ":history", 0, -1)]

    def names(self, kind: str) -> list[str]:
        return sorted(n.decode() for n in self.r.smembers(self._index(kind)))

    def verify(self, kind: str, name: str | None, store: ArtifactStore,
               entry: dict[str, str] | None = None) -> tuple[dict[str, str], bytes]:
        """(entry, artifact bytes that hash to the entry's SHA-256), or RegistryError. An AP-MAE
        entry points at a checkpoint directory: its weights file is what the hash covers."""
        entry = entry if entry is not None else self.latest(kind, name or "")
        rel = entry["path"] + ("/model.safetensors" if kind == "apmae" else "")
        try:
            return entry, store.read(rel, entry["sha256"])
        except FileNotFoundError as e:
            raise RegistryError(f"{kind} {name!r}: its artifact {rel} is missing") from e
        except ValueError as e:
            raise RegistryError(f"{kind} {name!r}: {e}") from e


class RegistryCache:
    """Artifacts named in the registry, loaded once and reloaded when their entry changes.

    The registry is looked at again at most every ``every_s`` seconds per name, so a
    retrained model is picked up without a restart and without a Redis round trip per message.
    ``load(entry)`` turns an entry into the loaded object (and must verify its checksum).
    """

    def __init__(self, registry: Registry, kind: str, load: Callable[[dict[str, str]], Any],
                 version_field: str = "sha256", every_s: float = 10.0):
        self.registry, self.kind, self.load = registry, kind, load
        self.version_field, self.every_s = version_field, every_s
        self.loaded: dict[str, tuple[dict[str, str], Any]] = {}
        self.checked: dict[str, float] = {}

    def get(self, name: str) -> tuple[dict[str, str], Any] | None:
        now = time.monotonic()
        if name in self.loaded and now - self.checked.get(name, 0.0) < self.every_s:
            return self.loaded[name]
        self.checked[name] = now
        entry = self.registry.get(self.kind, name)
        if entry is None:
            return self.loaded.get(name)
        old = self.loaded.get(name)
        if old is None or old[0][self.version_field] != entry[self.version_field]:
            self.loaded[name] = (entry, self.load(entry))
        return self.loaded[name]
