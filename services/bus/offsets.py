"""Where topics end, reading a range of a topic, and the consumer-lag probe.

Tansu 0.6.0 answers ListOffsets(latest) with the *base offset of the last record batch* + 1
(measured: 40 records produced as one batch report an end offset of 1), so every end offset
here is confirmed by reading the last batch (:func:`true_end_offsets`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from apmae.messages import InvalidMessage, decode
from apmae.topics import Topic
from services import metrics
from services.bus.client import Bus, Message

log = logging.getLogger("apmae.bus")


def topic_end_offsets(bus: Bus, topic: Topic | str) -> dict[TopicPartition, int]:
    """End offset of every partition of ``topic`` (empty when the topic does not exist)."""
    name = bus.name(topic)
    c = bus.consumer(None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(name, p) for p in sorted(c.partitions_for_topic(name) or [])]
    finally:
        c.close(autocommit=False)
    return true_end_offsets(bus, tps) if tps else {}


def true_end_offsets(bus: Bus, tps: Sequence[TopicPartition],
                     probe: KafkaConsumer | None = None) -> dict[TopicPartition, int]:
    """End offsets (last record + 1) per partition, correct on the embedded broker too.

    We read from the reported end to the tail and take the last offset + 1; on Apache Kafka
    the reported end is already right and the read confirms it. ``probe``: a group-less
    consumer to reuse (the lag probe keeps one), else one is made and closed here.
    """
    own = probe is None
    probe = probe or tail_probe(bus)
    try:
        reported = probe.end_offsets(list(tps))
        out = dict(reported)
        for tp, end in reported.items():
            if end <= 0:
                continue
            probe.assign([tp])
            probe.seek(tp, end - 1)
            empty_polls, seen_any = 0, False
            # read on to the real tail: one batch is enough on the memory engine, but on the
            # s3:// engine the reported end can sit several batches short (measured: 90 of 300)
            while empty_polls < (1 if seen_any else 20):
                recs = probe.poll(timeout_ms=100 if seen_any else 250).get(tp, [])
                if recs:
                    out[tp] = max(out[tp], recs[-1].offset + 1)
                    seen_any, empty_polls = True, 0
                else:
                    empty_polls += 1
        return out
    finally:
        if own:
            probe.close(autocommit=False)


def tail_probe(bus: Bus) -> KafkaConsumer:
    """A group-less consumer for reading tails: the broker answers an empty fetch at once
    (``fetch_max_wait_ms``), so confirming the tail costs one short poll, not 500 ms."""
    return bus.consumer(None, enable_auto_commit=False, fetch_max_wait_ms=10)


class LagProbe:
    """Consumer lag (end offset - position, per topic) measured off the processing thread.

    Measuring lag takes broker round trips (a whole new consumer, before this class); done
    inline every few seconds it stalled the loop it measures. The loop hands over a snapshot
    of its positions (:meth:`observe`, cheap); a daemon thread with one long-lived probe
    consumer turns it into the ``apmae_consumer_lag_messages`` gauge. A position past the
    end is reported and counted, never acted on: seeking on a probe that timed out would
    replay a partition for nothing.
    """

    def __init__(self, bus: Bus, service: str, group: str | None = None, every_s: float = 5.0):
        self.bus, self.service, self.group, self.every_s = bus, service, group or service, every_s
        self._snapshot: dict[TopicPartition, int] | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def observe(self, positions: dict[TopicPartition, int]) -> None:
        self._snapshot = dict(positions)
        self._wake.set()
        if self._thread is None:  # (again after close: a processor may run more than once)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._loop, args=(self._stop,), name=f"lag-{self.service}",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        self._thread = None

    def _loop(self, stop: threading.Event) -> None:
        probe = None
        try:
            while not stop.is_set():
                self._wake.wait()
                self._wake.clear()
                snap, self._snapshot = self._snapshot, None
                if stop.is_set() or not snap:
                    continue
                try:
                    probe = probe or tail_probe(self.bus)
                    self._report(snap, true_end_offsets(self.bus, list(snap), probe))
                except Exception as e:  # metrics must never break anything
                    log.debug("lag probe failed: %s", e)
                stop.wait(self.every_s)
        finally:
            if probe is not None:
                probe.close(autocommit=False)

    def _report(self, positions: dict[TopicPartition, int], ends: dict[TopicPartition, int]) -> None:
        per_topic: dict[str, int] = {}
        for tp, pos in positions.items():
            name = tp.topic.removeprefix(self.bus.cfg.topic_prefix)
            lag = ends.get(tp, pos) - pos
            if lag < 0:
                metrics.OFFSETS_RESET.labels(self.service, name).inc()
                log.error("%s: position %d is past the end %d of %s: was the topic recreated (broker "
                          "restarted)?", self.service, pos, ends[tp], tp)
                lag = 0
            per_topic[name] = per_topic.get(name, 0) + lag
        for name, lag in per_topic.items():
            metrics.CONSUMER_LAG.labels(self.service, name).set(lag)
            metrics.GROUP_LAG.labels(self.group, name).set(lag)


def read_range(
    bus: Bus, topic: Topic | str, start_offset: int | None = None, start_ms: int | None = None,
    end_ms: int | None = None, partitions: Sequence[int] | None = None, decode_records: bool = True,
) -> Iterator[Message | Any]:
    """Read a topic from an offset or timestamp up to its end *as of now*, with no group.

    Yields Messages (or raw kafka records when ``decode_records`` is False). Undecodable
    messages are yielded raw so callers (replay/export) can keep or dead-letter them.
    """
    c = bus.consumer(None, enable_auto_commit=False)
    name = bus.name(topic)
    try:
        parts = partitions if partitions is not None else sorted(c.partitions_for_topic(name) or [])
        tps = [TopicPartition(name, p) for p in parts]
        if not tps:
            return
        c.assign(tps)
        ends = true_end_offsets(bus, tps)
        starts = c.beginning_offsets(tps)
        if start_ms is not None:
            found = c.offsets_for_times({tp: start_ms for tp in tps})
            starts = {tp: (found[tp].offset if found.get(tp) else ends[tp]) for tp in tps}
        elif start_offset is not None:
            starts = {tp: max(starts[tp], start_offset) for tp in tps}
        todo = {tp for tp in tps if starts[tp] < ends[tp]}
        for tp in tps:
            c.seek(tp, starts[tp])
        idle = 0
        t = bus.logical(name)
        while todo and idle < 20:
            batch = c.poll(timeout_ms=500, max_records=500)
            idle = 0 if batch else idle + 1
            for tp, recs in batch.items():
                for r in recs:
                    if tp not in todo or r.offset >= ends[tp]:
                        continue
                    if start_ms is not None and r.timestamp < start_ms:
                        continue  # offsets_for_times may point at the start of a batch
                    if end_ms is not None and r.timestamp > end_ms:
                        todo.discard(tp)
                        continue
                    if not decode_records:
                        yield r
                    else:
                        try:
                            rec = decode(r.value, t.record, bus.cfg.max_message_bytes)
                            yield Message(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value, rec)
                        except InvalidMessage:
                            yield r
                    if r.offset + 1 >= ends[tp]:
                        todo.discard(tp)
    finally:
        c.close(autocommit=False)
