"""The bus client: apmae records over kafka-python, bound to one BusConfig and topic prefix.

A :class:`Bus` names topics (the prefix isolates tenants and test runs), creates them, makes
consumers, and produces records: :meth:`Bus.send` encodes and queues, :meth:`Bus.flush` waits
for every queued send and fails loudly if any was not acknowledged. Dead letters always fit
the size limit (the original is truncated, its digest and coordinates kept).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from apmae.config import BusConfig
from apmae.messages import InvalidMessage, Record, encode, stable_id
from apmae.topics import ALL_TOPICS, BY_NAME, DEADLETTER, DeadLetterRecord, Topic, topic_configs
from services import metrics

log = logging.getLogger("apmae.bus")


class Retryable(Exception):
    """Raised by a handler for a transient failure: the batch is retried, not dead-lettered."""


# Failures of the infrastructure, not of a message: the batch is rewound and retried with
# backoff (never dead-lettered, never committed) until Redis or the broker is back.
TRANSIENT: tuple[type[BaseException], ...] = (Retryable, KafkaError, ConnectionError, OSError,
                                              redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                                              # Redis at maxmemory (noeviction) refuses writes until freed
                                              redis.exceptions.OutOfMemoryError)
# OSErrors that no retry can fix: a path that is not there or not allowed (a deleted .npz, a
# rotated-out checkpoint). Retrying them stalled the partition forever; they are the
# message's failure and dead-letter it. Other OSErrors (disk full, too many open files, I/O
# errors, resets) stay transient: dead-lettering every input while the disk is full would
# empty the stream into the dead-letter topic.
PERMANENT_OS_ERRORS: tuple[type[OSError], ...] = (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                                  PermissionError)


def is_transient(e: BaseException) -> bool:
    return isinstance(e, TRANSIENT) and not isinstance(e, PERMANENT_OS_ERRORS)

# Room left in a dead letter for its header (reason, ids) next to the truncated original.
_DEADLETTER_HEADROOM = 16 * 1024


def native_crc32c() -> bool:
    """True when kafka-python checksums record batches with the ``crc32c`` C extension.

    Without it kafka-python falls back to pure Python CRC32C at ~6.5 MB/s, which then bounds
    every produce and consume (measured: 7.6 vs 191 MB/s produce on the same broker)."""
    try:
        import crc32c
        from kafka.record import util
    except ImportError:
        return False
    return util._crc32c is crc32c.crc32c


def kafka_security(cfg: BusConfig) -> dict[str, Any]:
    """kafka-python connection options for TLS / SASL from the config (PLAINTEXT by default)."""
    out: dict[str, Any] = {"security_protocol": cfg.security_protocol}
    if cfg.sasl_mechanism:
        out |= {
            "sasl_mechanism": cfg.sasl_mechanism,
            "sasl_plain_username": cfg.sasl_username,
            "sasl_plain_password": cfg.sasl_password,
        }
    if cfg.ssl_cafile:
        out["ssl_cafile"] = cfg.ssl_cafile
    return out


@dataclass(frozen=True, slots=True)
class Message:
    """A consumed message: where it came from, and its decoded record."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes
    record: Record


@dataclass(frozen=True, slots=True)
class Output:
    """One record to produce: to a logical topic (prefix added by the bus), with a key."""

    topic: Topic
    record: Record
    key: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A handler's verdict that one input cannot be processed (reason kept with its bytes)."""

    message: Message
    reason: str


def stay_until_session_expires(consumer: KafkaConsumer) -> None:
    """Make ``consumer`` leave its group by going silent, never by LeaveGroup.

    Tansu 0.6 (the embedded broker) drops a member that sends LeaveGroup while its group is
    forming but keeps it as the group's leader; only an evicted leader is replaced, so the
    group never forms again and every member waits without partitions, restarts included,
    until the broker restarts. A leader that stops while a newcomer joins triggers it (a
    fresh member got nothing in 40 s; without the LeaveGroup, all 4 partitions after 15 s),
    and so does kafka-python's own leave when a fit holds the GIL past max_poll_interval (a
    CI failure of the dead fit worker test, 2026-12-05). kafka-python sends LeaveGroup from
    close(), unsubscribe() and its heartbeat thread, all through ``maybe_leave_group_async``:
    here it forgets the membership locally and sends nothing, and the broker evicts the
    member when its session expires (<= 10 s), which does replace a leader."""
    coordinator = consumer._coordinator

    async def forget(reason: str | None = None, timeout_ms: int | None = None) -> None:
        coordinator.reset_generation()

    coordinator.maybe_leave_group_async = forget


class Bus:
    """Producer, admin and consumer factory bound to one BusConfig (and its topic prefix)."""

    def __init__(self, cfg: BusConfig, service: str = "apmae"):
        self.cfg = cfg
        self.service = service
        self._producers: dict[str, KafkaProducer] = {}  # codec -> producer
        self._pending: list[Any] = []  # send futures since the last flush
        self._out_series: dict[str, tuple[Any, Any]] = {}  # topic -> (messages, bytes) counters

    # -- names ---------------------------------------------------------------------------
    def name(self, t: Topic | str) -> str:
        return self.cfg.topic_prefix + (t.name if isinstance(t, Topic) else t)

    def logical(self, physical: str) -> Topic:
        return BY_NAME[physical.removeprefix(self.cfg.topic_prefix)]

    def group_id(self, group: str | None) -> str | None:
        """The broker's name of consumer group ``group``: under the topic prefix."""
        return None if group is None else self.cfg.topic_prefix + group

    # -- clients -------------------------------------------------------------------------
    def admin(self) -> KafkaAdminClient:
        return KafkaAdminClient(bootstrap_servers=self.cfg.bootstrap_servers, client_id=self.service,
                                **kafka_security(self.cfg))

    def ensure_topics(self, topics: Iterable[Topic] = ALL_TOPICS) -> list[str]:
        """Create missing topics with their declared partition counts; returns those created."""
        admin = self.admin()
        try:
            existing = set(admin.list_topics())
            new = [NewTopic(self.name(t), t.partitions, 1, topic_configs=topic_configs(t, self.cfg.max_message_bytes))
                   for t in topics if self.name(t) not in existing]
            if new:
                try:
                    admin.create_topics(new)
                except TopicAlreadyExistsError:
                    pass
            return [n.name for n in new]
        finally:
            admin.close()

    def codec(self, topic: Topic) -> str:
        """The compression a record of ``topic`` is sent with: the config's, or the topic's own
        when the config says "auto"."""
        comp = self.cfg.compression
        return topic.codec if comp == "auto" else (comp or "none")

    @property
    def producer(self) -> KafkaProducer:
        """The producer for the config's codec (zstd when it is "auto"): for raw sends."""
        comp = self.cfg.compression
        return self.producer_for("zstd" if comp == "auto" else (comp or "none"))

    def producer_for(self, codec: str) -> KafkaProducer:
        """One KafkaProducer per codec in use: compression is a producer-wide setting."""
        p = self._producers.get(codec)
        if p is None:
            p = self._producers[codec] = KafkaProducer(
                bootstrap_servers=self.cfg.bootstrap_servers,
                client_id=self.service,
                compression_type=None if codec == "none" else codec,
                acks="all",
                linger_ms=20,
                batch_size=1 << 20,
                max_request_size=self.cfg.max_message_bytes + 64 * 1024,
                retries=5,
                **kafka_security(self.cfg),
            )
        return p

    @property
    def session_timeout_ms(self) -> int:
        """How long the broker keeps a member that went silent (a crash, or a stop: see
        :func:`stay_until_session_expires`) before it hands its partitions on."""
        return min(10_000, self.cfg.group_poll_interval_ms)

    def consumer(self, group: str | None, topics: Sequence[Topic | str] = (), listener: Any = None,
                 **kw: Any) -> KafkaConsumer:
        """A consumer of ``topics`` (names under the prefix) in ``group``, or group-less.

        The group id carries the topic prefix like the topics and the done marks do: two
        tenants (or two test runs) with a group "assign" each have their own commits and
        members. Unprefixed, a stale member of one run's group kept the next run's members from
        ever getting partitions (the fault matrix's assigner)."""
        opts: dict[str, Any] = dict(
            bootstrap_servers=self.cfg.bootstrap_servers,
            client_id=self.service,
            group_id=self.group_id(group),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_interval_ms=self.cfg.group_poll_interval_ms,
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=1_000,
            # A group leader that fetched metadata while a restarted broker was still loading
            # its topics assigns no partitions of them, and kafka-python only rejoins when the
            # metadata changes, by default 5 min later: the member sat idle that long (the
            # fault matrix's durable broker restart). Refresh every 10 s instead.
            metadata_max_age_ms=10_000,
            max_partition_fetch_bytes=self.cfg.max_message_bytes + 64 * 1024,
            fetch_max_bytes=max(64 << 20, self.cfg.max_message_bytes * 4),
            **kafka_security(self.cfg),
        )
        opts.update(kw)
        c = KafkaConsumer(**opts)
        if group is not None and not self.cfg.leave_group:
            stay_until_session_expires(c)
        if topics:
            c.subscribe([self.name(t) for t in topics], listener=listener)
        return c

    # -- producing -----------------------------------------------------------------------
    def send(self, out: Output, timestamp_ms: int | None = None):
        value = encode(out.record)
        if len(value) > self.cfg.max_message_bytes:
            raise InvalidMessage(f"{out.record.SCHEMA} {out.record.id}: {len(value)} bytes over the "
                                 f"{self.cfg.max_message_bytes}-byte limit")
        name = out.topic.name
        series = self._out_series.get(name)
        if series is None:  # resolve the labelled children once per topic, not per message
            series = self._out_series[name] = (metrics.MESSAGES_OUT.labels(self.service, name),
                                               metrics.BYTES_OUT.labels(self.service, name))
        series[0].inc()
        series[1].inc(len(value))
        future = self.producer_for(self.codec(out.topic)).send(
            self.cfg.topic_prefix + name,
            key=(out.key or out.record.id).encode(),
            value=value,
            headers=[("id", out.record.id.encode()), ("schema", out.record.SCHEMA.encode())],
            timestamp_ms=timestamp_ms,
        )
        self._pending.append(future)
        return future

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until every send since the last flush is acknowledged; raise Retryable if any
        was not. kafka-python's flush() returns even when the producer aborted its batches (a
        restarted broker that forgot the idempotent producer id is fatal to the client): only
        the futures tell, and committing after such a flush would lose those messages."""
        if not self._producers:
            return
        for p in self._producers.values():
            p.flush(timeout=timeout)
        pending, self._pending = self._pending, []
        failed = [f.exception for f in pending if f.failed()]
        if failed or any(not f.is_done for f in pending):
            log.error("%d of %d sends were not acknowledged (%s): recreating the producers; the batch will be "
                      "retried", len(failed), len(pending), failed[0] if failed else "timeout")
            producers, self._producers = self._producers, {}
            for p in producers.values():
                p.close(0)
            raise Retryable(f"{len(failed)} sends failed: {failed[0] if failed else 'not acknowledged in time'}")

    def dead_letter(self, topic: str, partition: int, offset: int, value: bytes | None, reason: str) -> None:
        """Send the original bytes and the reason to the dead-letter topic.

        The dead letter must always fit the size limit, or sending it raises and the consumer
        retries the same input forever: an original too big to carry whole is cut, and its
        length and sha256 are kept in the reason so it can still be identified in the log."""
        value = bytes(value or b"")
        room = self.cfg.max_message_bytes - _DEADLETTER_HEADROOM
        if len(value) > room:
            digest = hashlib.sha256(value).hexdigest()
            reason = f"[original {len(value)} bytes, sha256 {digest}, truncated to {room}] {reason}"
            value = value[:room]
        rec = DeadLetterRecord(
            id=stable_id("dlq", topic, partition, offset), source_topic=topic, partition=partition,
            offset=offset, service=self.service, reason=reason[:4000], payload=value,
        )
        metrics.DEADLETTERS.labels(self.service, topic.removeprefix(self.cfg.topic_prefix)).inc()
        log.warning("dead letter from %s[%d]@%d: %s", topic, partition, offset, reason[:500])
        self.send(Output(DEADLETTER, rec, key=topic))

    def close(self) -> None:
        """Flush (raising Retryable if any send was lost, so callers never report success for
        data that is not in the log) and close the producers."""
        try:
            self.flush(30)
        finally:
            producers, self._producers = self._producers, {}
            for p in producers.values():
                p.close(10)
