"""The trainer's input pipeline: read, decode and shuffle the next batches while a step runs.

A prefetch thread owns the Kafka consumer (kafka-python's consumer is not thread-safe). It
reads a block of up to ``shuffle_window`` trainable patterns from this rank's partitions,
shuffles it with the previous block's leftovers (:func:`apmae.train.shuffle_block`), checks and
stacks whole batches of packed lower triangles at once (:func:`apmae.codec.read_packed`, numpy)
and hands them over through a queue of ``depth`` batches. The training thread takes batches
and converts them to float32 (:meth:`Batch.patterns`).

What has been trained is tracked per partition so a checkpoint can resume exactly although
batches are drawn out of order: the *low watermark* (the smallest offset read but not yet
trained, or the read position when nothing is pending) and the offsets at or above it that
were already trained. A restart seeks to the low watermark and skips those offsets: nothing
trained twice, nothing skipped. Inputs re-sent with an id already trained (a producer retry)
are dropped by id.

Epochs (``epochs`` > 1, for a fixed training set such as the study's): once every partition
is read to its end and what was handed over has been trained, the reader drops the last
partial batch (as a DataLoader's ``drop_last``), starts a new epoch at the partitions'
beginnings and forgets the epoch's bookkeeping. Watermarks are per epoch, so a checkpoint
stores the epoch beside them and a resume continues inside it. With ``epochs`` = 1 (the
default, a live stream) the reader waits for new patterns at the end instead.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from kafka import KafkaConsumer, TopicPartition

from apmae.codec import BadPattern, packed_values, payload_is_finite, read_packed
from apmae.messages import InvalidMessage, decode
from apmae.topics import PatternRecord
from apmae.train import shuffle_block

log = logging.getLogger("apmae.trainer")


@dataclass(frozen=True)
class Pending:
    """A trainable pattern read from the log, not yet trained."""

    partition: int
    offset: int
    id: str
    record: PatternRecord


@dataclass(frozen=True)
class Batch:
    packed: list[np.ndarray]  # per wire dtype in the batch: (G, S (S + 1) / 2) lower-triangle bits
    items: list[Pending]

    def patterns(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """(B, S (S + 1) / 2) float32 probabilities, packed lower triangles on ``device``
        (what :meth:`apmae.mae.APMAE.patches` takes), converted by the caller: the training
        thread, on torch's threads or the GPU (no torch op on the prefetch thread:
        :func:`apmae.codec.read_packed`)."""
        xs = [packed_values(bits, device) for bits in self.packed]
        return xs[0] if len(xs) == 1 else torch.cat(xs)


class Progress:
    """Per partition: what was read, what is pending, what was trained above the watermark.

    Shared by the prefetch thread (reads) and the training thread (trains, checkpoints)."""

    def __init__(self, start: dict[int, int], trained_above: dict[int, set[int]], epoch: int = 0):
        self._lock = threading.Lock()
        self.epoch = epoch  # passes over the partitions completed before this one
        self.read_to = dict(start)  # partition -> next offset to read
        self.pending: dict[int, set[int]] = {p: set() for p in start}
        self.trained: dict[int, set[int]] = {p: set(trained_above.get(p, ())) for p in start}

    def has_pending(self) -> bool:
        with self._lock:
            return any(self.pending.values())

    def new_epoch(self, start: dict[int, int]) -> None:
        """The next pass, from ``start``; only once nothing of this one is pending."""
        with self._lock:
            if any(self.pending.values()):
                raise RuntimeError("a new epoch with patterns of the last one still pending")
            self.epoch += 1
            self.read_to = dict(start)
            self.trained = {p: set() for p in start}

    def on_read(self, partition: int, offset: int, trainable: bool) -> None:
        with self._lock:
            if trainable:
                self.pending[partition].add(offset)
            self.read_to[partition] = max(self.read_to[partition], offset + 1)

    def on_trained(self, items: list[Pending]) -> None:
        with self._lock:
            for i in items:
                self.pending[i.partition].discard(i.offset)
                self.trained[i.partition].add(i.offset)

    def state(self) -> tuple[dict[int, int], dict[int, list[int]]]:
        """(low watermark per partition, trained offsets at or above it): a resume point."""
        return self.snapshot()[1:]

    def snapshot(self) -> tuple[int, dict[int, int], dict[int, list[int]]]:
        """(epoch, low watermarks, trained above them), read together: the epoch may turn
        between two separate reads."""
        with self._lock:
            low = {p: min(self.pending[p]) if self.pending[p] else self.read_to[p] for p in self.read_to}
            for p, done in self.trained.items():  # forget what the watermark has passed
                self.trained[p] = {o for o in done if o >= low[p]}
            return self.epoch, low, {p: sorted(v) for p, v in self.trained.items() if v}


class Prefetcher:
    """Reads, filters, shuffles and decodes batches on a daemon thread (see the module doc)."""

    def __init__(self, consumer: KafkaConsumer, topic: str, start: dict[int, int],
                 trained_above: dict[int, set[int]], *, batch_size: int, pattern_size: int, shuffle_window: int,
                 seed: int, depth: int = 2, target_model: str = "", max_bytes: int | None = None,
                 dead_letter: Callable[[object, str], None], on_skipped: Callable[[], None] = lambda: None,
                 remember_ids: int = 200_000, epochs: int = 1, epoch: int = 0):
        self.consumer, self.topic = consumer, topic
        self.batch_size, self.pattern_size, self.window, self.seed = batch_size, pattern_size, shuffle_window, seed
        self.target_model, self.max_bytes = target_model, max_bytes
        self.dead_letter, self.on_skipped = dead_letter, on_skipped
        self.progress = Progress(start, trained_above, epoch)
        self.epochs = epochs
        self.dropped_last = 0  # patterns of an epoch's last partial batch, not trained in that epoch
        self._skip = {p: set(v) for p, v in trained_above.items()}  # trained before the restart
        self._seen_ids: OrderedDict[str, None] = OrderedDict()  # recently queued ids (duplicates)
        self._remember = remember_ids
        self.duplicates = 0
        self.queue: queue.Queue[Batch | BaseException] = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self._blocks = 0
        self.call_since: float | None = None  # when this thread's call into the client began
        for p, o in start.items():
            consumer.seek(TopicPartition(topic, p), o)
        self._thread = threading.Thread(target=self._run, name="trainer-prefetch", daemon=True)
        self._thread.start()

    # -- the training thread's side ---------------------------------------------------------
    def next(self, timeout_s: float) -> Batch | None:
        """The next batch, or None if none was ready within ``timeout_s``."""
        try:
            got = self.queue.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if isinstance(got, BaseException):
            raise got
        return got

    def close(self) -> None:
        self.stop.set()
        self._thread.join(10)

    def hung_for(self) -> float | None:
        """Seconds the prefetch thread's call into the Kafka client has run (None: none is).
        kafka-python 3.0.12 waits for its IO thread with no timeout, and after a durable
        broker restart that wait sometimes never ended (see services.bus.ConsumerStalled)."""
        since = self.call_since
        return None if since is None else time.monotonic() - since

    @contextmanager
    def _client_call(self) -> Iterator[None]:
        self.call_since = time.monotonic()
        try:
            yield
        finally:
            self.call_since = None

    # -- the prefetch thread ----------------------------------------------------------------
    def _run(self) -> None:
        """Blocks of up to ``shuffle_window`` patterns, the next one read between the batches of
        the current one (a block read in one go stalled training at every block boundary); the
        first block is four batches, so training starts without waiting for a whole window."""
        try:
            leftovers: list[Pending] = []
            ahead: list[Pending] = []  # the next block, read while this one is trained
            want = min(self.window, 4 * self.batch_size)
            while not self.stop.is_set():
                ahead += self._read(want - len(ahead))
                block, ahead, want = ahead, [], self.window
                if not block and len(leftovers) < self.batch_size:
                    if self.progress.epoch + 1 < self.epochs and self._read_to_end():
                        self._next_epoch(leftovers)
                        leftovers, want = [], min(self.window, 4 * self.batch_size)
                    continue
                order = shuffle_block(leftovers + block, self.seed, self._blocks)
                self._blocks += 1
                while len(order) >= self.batch_size and not self.stop.is_set():
                    chunk, order = order[:self.batch_size], order[self.batch_size:]
                    batch = self._decode(chunk)
                    if batch.items:  # else every pattern of it was dead-lettered: nothing to train
                        self._put(batch)
                    if len(ahead) < self.window:
                        ahead += self._read(min(self.window - len(ahead), 2 * self.batch_size), polls=1)
                leftovers = order
        except BaseException as e:  # noqa: BLE001 - handed to the training thread
            self._put(e)
        finally:
            with self._client_call():
                self.consumer.close(autocommit=False)

    def _read_to_end(self) -> bool:
        """Is every partition read to its end (the end as of now)?"""
        tps = [TopicPartition(self.topic, p) for p in self.progress.read_to]
        with self._client_call():
            ends = self.consumer.end_offsets(tps)
            return all(self.consumer.position(tp) >= ends[tp] for tp in tps)

    def _next_epoch(self, leftovers: list[Pending]) -> None:
        """Drop the last partial batch, wait until the handed-over batches are trained (the
        watermarks are per epoch), then start over at the partitions' beginnings."""
        self.progress.on_trained(leftovers)  # done with for this epoch: must not hold the watermark
        self.dropped_last += len(leftovers)
        while self.progress.has_pending() and not self.stop.is_set():
            time.sleep(0.02)
        if self.stop.is_set():
            return
        tps = [TopicPartition(self.topic, p) for p in self.progress.read_to]
        with self._client_call():
            begin = {tp.partition: o for tp, o in self.consumer.beginning_offsets(tps).items()}
        self.progress.new_epoch(begin)
        self._skip, self._seen_ids = {}, OrderedDict()  # a new pass trains every pattern once more
        for tp in tps:
            self.consumer.seek(tp, begin[tp.partition])
        log.info("epoch %d of %d: starting over at the partitions' beginnings", self.progress.epoch + 1,
                 self.epochs)

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _read(self, want: int, polls: int | None = None) -> list[Pending]:
        """Up to ``want`` trainable patterns, in at most ``polls`` polls (None: until ``want``);
        returns early once a poll comes back empty."""
        block: list[Pending] = []
        n = 0
        while len(block) < want and not self.stop.is_set() and (polls is None or n < polls):
            n += 1
            with self._client_call():
                polled = self.consumer.poll(timeout_ms=300 if polls is None else 0,
                                            max_records=min(500, want - len(block)))
            if not polled:
                break
            for tp, recs in polled.items():
                for r in recs:
                    item = self._filter(tp.partition, r)
                    self.progress.on_read(tp.partition, r.offset, item is not None)
                    if item is not None:
                        block.append(item)
        return block

    def _filter(self, partition: int, r) -> Pending | None:
        if r.offset in self._skip.get(partition, ()):
            return None  # trained before the restart
        try:
            rec = decode(r.value, PatternRecord, self.max_bytes)
            if rec.size != self.pattern_size:
                raise BadPattern(f"pattern size {rec.size} != model pattern size {self.pattern_size}")
            if not payload_is_finite(rec.payload, rec.dtype):  # dead-lettered on read: batches stay full
                raise BadPattern("decoded pattern has non-finite values")
        except (InvalidMessage, BadPattern) as e:
            self.dead_letter(r, str(e))
            return None
        if self.target_model and rec.model != self.target_model:
            self.on_skipped()
            return None
        if rec.id in self._seen_ids:
            self.duplicates += 1
            return None
        self._seen_ids[rec.id] = None
        if len(self._seen_ids) > self._remember:
            self._seen_ids.popitem(last=False)
        return Pending(partition, r.offset, rec.id, rec)

    def _decode(self, chunk: list[Pending]) -> Batch:
        """Check and stack a batch's packed patterns at once (one call per wire dtype in it);
        the training thread converts them (:meth:`Batch.patterns`)."""
        by_dtype: dict[str, list[int]] = {}
        for i, item in enumerate(chunk):
            by_dtype.setdefault(item.record.dtype, []).append(i)
        xs, kept, bad = [], [], {}
        for dtype, idx in by_dtype.items():
            bits, k, b = read_packed([chunk[i].record.payload for i in idx], self.pattern_size, dtype)
            xs.append(bits)
            kept += [idx[j] for j in k]
            bad |= {idx[j]: reason for j, reason in b.items()}
        for i, reason in bad.items():  # checked on read already; kept as a last guard
            self.dead_letter(_AsRaw(self.topic, chunk[i]), reason)
        if bad:
            self.progress.on_trained([chunk[i] for i in bad])  # done with: must not hold the watermark
        return Batch(xs, [chunk[i] for i in kept])


@dataclass(frozen=True)
class _AsRaw:
    """A pending pattern in the shape of a consumed record, for the dead-letter call."""

    topic: str
    item: Pending

    @property
    def partition(self) -> int:
        return self.item.partition

    @property
    def offset(self) -> int:
        return self.item.offset

    @property
    def value(self) -> bytes:
        from apmae.messages import encode

        return encode(self.item.record)


def wait_for_batch(prefetch: Prefetcher, deadline: float | None, stop: threading.Event,
                   hang_s: float | None = None) -> Batch | None:
    """Block until a batch is ready, the deadline passes or ``stop`` is set. Raises
    ConsumerStalled when the prefetch thread's call into the client has run past ``hang_s``:
    its batches would never come, and only a new process sheds the client."""
    from services.bus import ConsumerStalled

    while not stop.is_set():
        hung = prefetch.hung_for()
        if hang_s is not None and hung is not None and hung > hang_s:
            raise ConsumerStalled(f"the trainer's input: a call into the Kafka client has not returned for "
                                  f"{hung:.0f} s")
        timeout = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
        b = prefetch.next(timeout)
        if b is not None:
            return b
        if deadline is not None and time.monotonic() >= deadline:
            return None
    return None
