"""``apmae encode``: mining patterns in, AP-MAE CLS embeddings out (paper 5.1, Encoding).

Consumes ``patterns.mine`` in a consumer group, embeds each pattern with the current AP-MAE
checkpoint (an unmasked pass over the 36 lower-triangle patches, CLS output), and publishes
EmbeddingRecords keyed by (model, layer, head), so replicas split heads by partition. The
checkpoint comes from the model registry (Redis, written by the trainer); a newly announced
checkpoint is picked up between batches without a restart, after its SHA-256 is checked.
Each embedding records the checkpoint that made it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import redis
import torch
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge

from apmae.codec import packed_values, read_packed
from apmae.config import BusConfig, setting
from apmae.mae import APMAE, from_pretrained, is_hub_id, resolve_pretrained
from apmae.topics import EMBEDDINGS, PATTERNS_MINE, EmbeddingRecord, head_key
from services.bus import Bus, DeadLetter, DoneStore, Message, Output, Processor, Retryable
from services.registry import FileDigests, Registry, sha256_file

log = logging.getLogger("apmae.encoder")
EMBEDDED = PromCounter("apmae_encoder_embeddings_total", "Patterns embedded", ["model"])
CHECKPOINT_STEP = Gauge("apmae_encoder_checkpoint_step", "Step of the AP-MAE checkpoint in use")
READ = PromCounter("apmae_encoder_batches_read_total", "Pattern batches read off the wire: ahead (on the helper "
                   "that fetched them, beside the last forward) or inline (before the forward)", ["where"])
# batches read ahead and not (yet) handled that are kept: one in the common case; a few more
# when a rewind or a poison split leaves some behind
READ_AHEAD_KEPT = 4


@dataclass(frozen=True)
class EncoderConfig(BusConfig):
    checkpoint: str = setting("apmae", "Registry name of the AP-MAE run to follow, a checkpoint directory, or a "
                                       "Hugging Face hub id (org/name)")
    batch_size: int = setting(128, "Patterns per embedding batch")
    reload_check_s: float = setting(5.0, "Seconds between registry checks for a new checkpoint")
    device: str = setting("", "cpu or cuda (default: cuda when available)")
    group: str = setting("encoder", "Consumer group on patterns.mine")


class Encoder:
    def __init__(self, cfg: EncoderConfig):
        self.cfg = cfg
        self.bus = Bus(cfg, "encoder")
        self.redis = redis.Redis.from_url(cfg.redis_url)
        self.registry = Registry(self.redis, cfg.topic_prefix)
        self.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model: APMAE | None = None
        self.sha: str | None = None
        self.tag = ""
        self.checked = 0.0
        self.digest = FileDigests()  # a fixed checkpoint directory is checked every reload_check_s
        # batches read ahead (prepare): read_key -> (the payload objects read, read_packed's result)
        self.read_ahead: OrderedDict[tuple, tuple[list, tuple]] = OrderedDict()
        self.read_ahead_lock = threading.Lock()  # the helper adds while the handler takes

    def current(self) -> tuple[Path, str, str, bool] | None:
        """(checkpoint dir, sha256, tag, whether that sha256 was read off the file): a fixed
        directory, the run the registry points at, or a hub id's snapshot (fetched once into
        the state directory's hub cache)."""
        p = Path(self.cfg.checkpoint)
        if (p / "model.safetensors").exists():
            return p, self.digest(p / "model.safetensors"), p.name, True
        entry = self.registry.get("apmae", self.cfg.checkpoint)
        if entry is None:
            if is_hub_id(self.cfg.checkpoint):
                p = resolve_pretrained(self.cfg.checkpoint, cache_dir=self.cfg.state_dir / "hub")
                return p, self.digest(p / "model.safetensors"), self.cfg.checkpoint, True
            return None
        return (self.cfg.artifacts_dir / entry["path"], entry["sha256"], f"{self.cfg.checkpoint}@{entry['step']}",
                False)

    def ensure_model(self) -> None:
        now = time.monotonic()
        if self.model is not None and now - self.checked < self.cfg.reload_check_s:
            return
        self.checked = now
        cur = self.current()
        if cur is None:
            raise Retryable(f"no AP-MAE checkpoint registered as {self.cfg.checkpoint!r} yet")
        path, sha, tag, read_off_the_file = cur
        if sha == self.sha:
            return
        # the registry's sha256 against the file, in full (a new checkpoint, once)
        if not read_off_the_file and sha256_file(path / "model.safetensors") != sha:
            raise Retryable(f"checkpoint {path} does not match its registered SHA-256 (still being written?)")
        self.model, meta = from_pretrained(path, self.device)
        self.sha, self.tag = sha, tag
        CHECKPOINT_STEP.set(meta.get("step", 0))
        log.info("embedding with %s (%s)", tag, path)

    def batches(self, msgs: list[Message], size: int) -> tuple[list[DeadLetter], list[list[Message]]]:
        """The forward's batches: at most ``batch_size`` patterns of one wire dtype each, in
        order; a pattern of another size than the model's is a dead letter."""
        dead: list[DeadLetter] = []
        by_dtype: dict[str, list[Message]] = {}
        for m in msgs:
            if m.record.size != size:
                dead.append(DeadLetter(m, f"pattern size {m.record.size} != AP-MAE pattern size {size}"))
            else:
                by_dtype.setdefault(m.record.dtype, []).append(m)
        step = self.cfg.batch_size
        return dead, [group[k:k + step] for group in by_dtype.values() for k in range(0, len(group), step)]

    @staticmethod
    def read_key(batch: list[Message], size: int) -> tuple:
        """Where a batch's read is kept: the size, the dtype and the records' places (a hit
        is used only for the very payload objects read: :meth:`read`)."""
        return size, batch[0].record.dtype, tuple((m.topic, m.partition, m.offset) for m in batch)

    def prepare(self, msgs: list[Message]) -> None:
        """Read the next batch's payloads (:func:`read_packed`: length and finiteness checks,
        the rows stacked) on the Processor's helper that fetched them, beside this batch's
        forward; :meth:`read` takes them, or reads in line."""
        model = self.model
        if model is None:  # no checkpoint yet: the handler reads in line
            return
        size = model.cfg.pattern_size
        for batch in self.batches(msgs, size)[1]:
            payloads = [m.record.payload for m in batch]
            read = read_packed(payloads, size, batch[0].record.dtype)
            with self.read_ahead_lock:
                self.read_ahead[self.read_key(batch, size)] = (payloads, read)
                while len(self.read_ahead) > READ_AHEAD_KEPT:
                    self.read_ahead.popitem(last=False)

    def read(self, batch: list[Message], size: int) -> tuple:
        """:func:`read_packed` of a batch: as read ahead by :meth:`prepare` from these very
        payloads (the Processor hands the handler the messages it prepared), or here."""
        payloads = [m.record.payload for m in batch]
        with self.read_ahead_lock:
            got = self.read_ahead.pop(self.read_key(batch, size), None)
        if got is not None and all(a is b for a, b in zip(got[0], payloads, strict=True)):
            READ.labels("ahead").inc()
            return got[1]
        READ.labels("inline").inc()  # nothing read ahead, or from other objects (a topic recreated, offsets reused)
        return read_packed(payloads, size, batch[0].record.dtype)

    def handle(self, msgs: list[Message]) -> list[Output | DeadLetter]:
        """Embed a batch: one unmasked forward per ``batch_size`` patterns, fed their packed lower
        triangles as they came off the wire (:meth:`apmae.mae.APMAE.patches`: no square is built)."""
        self.ensure_model()
        size = self.model.cfg.pattern_size
        dead, batches = self.batches(msgs, size)
        out: list[Output | DeadLetter] = list(dead)
        for batch in batches:
            bits, kept, bad = self.read(batch, size)
            out += [DeadLetter(batch[i], reason) for i, reason in bad.items()]
            if not kept:
                continue
            with torch.inference_mode():
                emb = self.model.embed(packed_values(bits, self.device)).float().cpu().numpy()
            for i, e in zip(kept, emb, strict=True):
                r = batch[i].record
                out.append(Output(EMBEDDINGS, EmbeddingRecord(
                    id=f"{r.id}@{self.sha[:12]}", sample_id=r.sample_id, model=r.model, task=r.task,
                    layer=r.layer, head=r.head, correct=r.correct, checkpoint=self.tag, dim=int(e.shape[0]),
                    payload=e.astype("<f4").tobytes()), key=head_key(r.model, r.layer, r.head)))
            for model, k_model in Counter(batch[i].record.model for i in kept).items():
                EMBEDDED.labels(model).inc(k_model)
        return out

    def processor(self) -> Processor:
        self.bus.ensure_topics([PATTERNS_MINE, EMBEDDINGS])
        # with a core to spare the helper fetches the next batch, reads its payloads and ends the
        # last one (publish, flush, marks, commit) while the forward runs; the handler never
        # touches the bus
        spare = self.a_core_to_spare()
        log.info("%s a core to spare: the next batch's fetch and the last one's ending %s the forward",
                 "with" if spare else "without", "beside" if spare else "after")
        return Processor(self.bus, self.cfg.group, [PATTERNS_MINE], self.handle,
                         done=DoneStore(self.redis, self.cfg.topic_prefix + self.cfg.group),
                         batch_size=self.cfg.batch_size, prefetch=spare, overlap_ending=spare,
                         prepare=self.prepare)

    def a_core_to_spare(self) -> bool:
        """Whether fetching the next batch during the forward has a core to run on: a GPU
        forward leaves the CPU to it, a CPU one only when torch uses fewer threads than there
        are cores. benchmarks/encoder.py, paired rounds on 2 cores (2026-12-04): with one
        torch thread the prefetching service ran 1.14x the inline one (0.89x a raw forward);
        with two, 0.95x: the poll then only takes the forward's cores."""
        cores = len(os.sched_getaffinity(0))  # the cores this process may run on (a container's cpuset)
        return torch.device(self.device).type != "cpu" or torch.get_num_threads() < cores
