"""The at-least-once processing loop every consuming service runs.

It follows the stream-processor recipe (Quix Streams, Bytewax)::

    poll a batch -> decode (failures -> dead letters) -> drop inputs already done
      -> handle -> produce outputs -> flush -> mark inputs done -> commit offsets

Offsets are committed only after every output of the batch is acknowledged by the broker.
If the flush or the handler fails with a retryable error, nothing is committed and the
consumer seeks back, so this (or the next) owner of the partition reprocesses the batch.
Outputs carry deterministic ids; the "done" marks (Redis, keyed by consumer group and input
id) let a re-delivered input be skipped when its outputs were already flushed, which closes
the usual duplicate window of at-least-once delivery to the instant between a flush and its
mark. Any message that cannot be decoded or whose processing raises goes to the dead-letter
topic with the reason and its original bytes; the service keeps running.

Per-message work here is kept to the decode itself: payloads stay views of the fetched
bytes, metrics are counted per batch, duplicates are looked up in one Redis round trip per
batch, and consumer lag is measured on another thread (:class:`~services.bus.offsets.LagProbe`).

A stage with a core to spare may overlap each batch's ending with the next batch's handler
(``Processor.overlap_ending``): batch k+1 is handled on the loop's thread while a helper
publishes, flushes, marks and commits batch k, in that order, and then fetches batch k+2.
The protocol is the same, one batch later: a commit still follows its own batch's flush,
and a failed ending rewinds both batches.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from apmae.messages import Record, decode
from apmae.topics import Topic
from services import metrics
from services.bus import failpoints
from services.bus.client import TRANSIENT, Bus, DeadLetter, Message, Output, is_transient
from services.bus.done import DoneStore
from services.bus.offsets import LagProbe, tail_probe, true_end_offsets

log = logging.getLogger("apmae.bus")

Handler = Callable[[list[Message]], Iterable[Output | DeadLetter]]


class ConsumerStalled(RuntimeError):
    """The stage's consumer fetches nothing while its input is not read to its end, for
    longer than a healthy consumer could. Everything the loop committed is durable and
    nothing after it is lost; the process should start again (the service runtime re-executes
    itself: :func:`services.runtime.run_loop`), and the group resumes from its commits.

    Why a new process and not a new consumer: after a durable broker restart, kafka-python
    3.0.12's consumer sometimes never sent another FindCoordinator request and polled nothing
    for minutes (the fault matrix's producer lost 19 of 24 files when the stage then stopped
    "idle"). A second consumer made in the same process joined the group, but its poll then
    blocked forever (main thread in ``NetworkSelector.run``, its IO thread idle in select;
    py-spy, reproduced 3 of 3 by tests/integration/test_bus.py's wedged consumer). A fresh
    process has none of that client state."""


@dataclass(frozen=True)
class RunLimits:
    """When :meth:`Processor.run` stops: its keyword arguments that a command line sets (the
    loop options of every consuming service), one object from the options to the loop."""

    max_messages: int | None = None
    idle_timeout_s: float | None = None
    until_caught_up: bool = False


@dataclass
class Processor:
    """Consume ``inputs`` as ``group``, run ``handler`` on batches, produce, flush, commit.

    ``handler`` receives decoded messages and yields Outputs (and DeadLetters for inputs it
    rejects). If it raises on a batch, each message is retried on its own so one poison
    message is dead-lettered without taking its neighbours with it.
    """

    bus: Bus
    group: str
    inputs: Sequence[Topic]
    handler: Handler
    done: DoneStore | None = None
    batch_size: int = 64
    poll_timeout_ms: int = 500
    flush_every: int = 256
    stop_event: threading.Event = field(default_factory=threading.Event)
    on_commit: Callable[[dict[TopicPartition, int]], None] | None = None
    # state changes that must follow, never precede, the batch's outputs being durable
    on_flushed: Callable[[], None] | None = None
    # called before each batch: a handler that keeps state for on_flushed drops a failed
    # batch's here, so that the next batch's flush never finalizes what was never written
    on_batch_start: Callable[[], None] | None = None
    consumer: KafkaConsumer | None = None
    processed: int = 0
    lag_every_s: float = 5.0
    # Nothing fetched for this long while the broker confirms unread records: the consumer
    # is wedged (ConsumerStalled). Well above a healthy rejoin (session timeout <= 10 s).
    stall_after_s: float = 30.0
    # A call into the Kafka client (a poll, a commit, a lookup, the close) that has not returned
    # for this long never will (see ConsumerStalled); a service's watchdog then starts the
    # process again (services.runtime.run_loop).
    poll_hang_s: float = 120.0
    poll_since: float | None = None  # when the client call in progress began (None: none is)
    polled_at: float = 0.0  # when the last poll returned (time.monotonic)
    # until_caught_up: how often a member whose partitions are read asks after the group's
    # others (a broker round trip per partition), and the bound on each commit lookup
    group_check_every_s: float = 2.0
    group_check_timeout_ms: int = 2000
    # until_caught_up: the group's other members committed nothing of their unread partitions
    # for this long while this member's are read: ConsumerStalled, and the process starts
    # again with a fresh join. After a durable broker restart the fault matrix's lone encoder
    # held 2-3 of 8 partitions and waited 600 s on the others, which no member ever read
    # (make test, 2026-12-04): a wait with no bound is a hang.
    peers_stall_s: float = 120.0
    # Fetch the next batch while the handler runs on this one (a helper thread polls, the
    # handler stays on the loop's thread): kafka-python parses and decompresses a fetch on the
    # polling thread, and with the poll in line the encoder ran at its serial bound, 0.51x a
    # raw forward with 12 of 16 cores idle (benchmarks/spare_cores.sh, 2026-12-04).
    prefetch: bool = True
    # ... but only after a handler that took at least this long. A helper thread costs its
    # start, its join and polls of its own, and beside a handler that returns at once it
    # overlaps nothing: with a no-op handler the bus benchmark's consume ran 1.095x faster
    # (1.008-1.110) on 0.885x the CPU (0.849-0.977) polling in line (12 paired rounds, 3,000
    # patterns, 2026-12-07). The first batch fetches ahead: nothing is known yet.
    prefetch_min_s: float = 0.005
    # End each batch (publish, flush, done marks, commit) on the helper thread while the
    # handler runs on the next one. With the ending in line, the encoder's loop spent ~7% of
    # its thread on it with one torch thread and a core spare (py-spy, 2026-12-06: sends 3.4%,
    # flush 1.6%, marks 1.0%, commit 0.5%, beside the forward's 87%). For a handler that
    # neither uses the bus itself nor keeps state for on_flushed / on_batch_start: its batch k+1
    # runs before batch k's outputs are durable.
    overlap_ending: bool = False
    # Work on the next batch that needs neither the bus nor the handler's state, run on the
    # helper that fetched it, beside this batch's handler: the batch's envelopes are decoded
    # there (``_begin`` takes them, for the very records fetched) and ``prepare`` gets its
    # messages. What ``prepare`` computes it keeps itself, for the handler to find by those
    # message objects; the handler must give the same verdicts without it (a batch polled in
    # line or read again after a rewind is new objects; a poison split or the done marks hand
    # over fewer). Skipped when the handler has already returned (the loop's thread would
    # only wait for it). Keep it short: until it returns the helper holds the consumer, and
    # a heartbeat the handler asks for waits. What it raises is counted
    # (``apmae_prepare_failures_total``) and the handler does that work. The encoder reads its
    # patterns' payloads here (``read_packed``: ~4% of its loop's thread beside a one-thread
    # forward, py-spy, 2026-12-07).
    prepare: Callable[[list[Message]], None] | None = None

    def __post_init__(self) -> None:
        if self.overlap_ending and (self.on_flushed or self.on_batch_start):
            raise ValueError("overlap_ending: a handler's on_flushed / on_batch_start state would see the next "
                             "batch begin before this one's outputs are durable")
        svc = self.bus.service
        for t in self.inputs:  # dead-letter and lag series exist (at 0) from the start
            metrics.DEADLETTERS.labels(svc, t.name)
            metrics.CONSUMER_LAG.labels(svc, t.name)
        if self.prepare is not None:  # and so do a preparing service's prepare failures
            metrics.PREPARE_FAILURES.labels(svc)
        self._committed: dict[TopicPartition, int] = {}  # what this process committed last
        self._beat_tried_at = 0.0
        self._assigned_now: list[TopicPartition] = []
        self._in = {t.name: metrics.MESSAGES_IN.labels(svc, t.name) for t in self.inputs}
        self._duplicates = metrics.DUPLICATES_SKIPPED.labels(svc)
        self._publish_s = metrics.PUBLISH_SECONDS.labels(svc)
        self._processing_s = metrics.PROCESSING_SECONDS.labels(svc)
        self._lag = LagProbe(self.bus, svc, self.group, self.lag_every_s)
        self._lag_due = 0.0
        self._probe: KafkaConsumer | None = None
        self._prefetched: list[Any] = []  # the next batch, fetched while the handler ran
        # ... its envelopes decoded on the helper (prepare), by (topic, partition, offset): the
        # record object fetched and what it decoded to
        self._decoded_ahead: dict[tuple[str, int, int], tuple[Any, Message | DeadLetter]] = {}
        self._prepare_failed = False  # one warning per processor, then the counter
        self._handler_s = float("inf")  # how long the last handler ran (prefetch_min_s)
        # while alive, that thread alone uses the consumer; setting its event stops it
        self._helper: tuple[threading.Thread, threading.Event] | None = None
        self._handled: _Handled | None = None  # overlap_ending: the batch whose ending is still to come
        self._ending_error: BaseException | None = None  # ... and what its ending raised on the helper
        self._progress: Callable[[int], Any] | None = None  # run()'s, told of each committed batch

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self._assigned_now = list(assigned)  # checked after poll returns (the client forbids calls from here)

    def _check_vanished_offsets(self) -> None:
        """Say so when offsets this process committed are gone: the broker lost its state
        (the embedded one keeps topics in memory). Consumption then restarts from the
        beginning of what the broker holds now; done marks drop anything seen before."""
        assigned, self._assigned_now = self._assigned_now, []
        for i, tp in enumerate(assigned):
            if tp not in self._committed:
                continue
            try:
                with self._watched():
                    gone = self.consumer.committed(tp, timeout_ms=self.group_check_timeout_ms) is None
            except BaseException:
                self._assigned_now = assigned[i:]  # the lookup failed: check the rest after the next poll
                raise
            if gone:
                name = self.bus.logical(tp.topic).name
                metrics.OFFSETS_RESET.labels(self.bus.service, name).inc()
                log.error("%s: the committed offset %d of %s vanished: broker restarted and lost its topics? "
                          "reading %s from its beginning", self.bus.service, self._committed[tp], tp, tp.topic)
                del self._committed[tp]

    def heartbeat(self) -> None:
        """Keep group membership alive during a long batch (call between chunks of work).

        kafka-python leaves the group when poll() is not called within max_poll_interval_ms,
        which must stay short on the embedded broker. Polling with every partition paused
        fetches nothing and counts as a poll.

        It never raises. A rebalance noticed here (RebalanceInProgress, a failed rejoin) used
        to escape from the middle of a batch, before its flush and done marks, so the retry
        redid every forward pass. Now the batch finishes, flushes and marks; only its commit
        can fail, and the retried batch is then dropped by the done marks: a rebalance costs
        no recomputation. With overlap_ending, but for the batch handled beside that commit:
        it is not marked yet, and is read and handled again.
        """
        if self.consumer is None or self._helper_has_consumer():
            return  # a prefetch's helper has the consumer; its polls keep the membership
        try:
            parts = self.consumer.assignment()
            self.consumer.pause(*parts)
            try:
                self._poll(0, None)
            finally:
                self.consumer.resume(*[p for p in parts if p in self.consumer.assignment()])
        except KafkaError as e:
            metrics.ERRORS.labels(self.bus.service, type(e).__name__).inc()
            log.warning("%s: heartbeat poll failed (%s); finishing the batch, its commit decides", self.bus.service, e)

    def _poll(self, timeout_ms: int, max_records: int | None) -> dict:
        """The consumer's poll, timed so that a watchdog can tell one that never returns:
        kafka-python 3.0.12 waits for its IO thread without a timeout, and after a durable
        broker restart that wait sometimes never ended (py-spy: main thread in
        ``NetworkSelector.run``; the fault matrix's producer and assigner)."""
        with self._watched():
            polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        self.polled_at = time.monotonic()
        return polled

    @contextmanager
    def _watched(self) -> Iterator[None]:
        """Time a call into kafka-python for the watchdog (``poll_hung``). Every blocking call
        the loop makes is one: the poll, the commit, position and commit lookups, the probes of
        ends, the close. Each waits on the client's IO thread the way the poll does, and the
        watchdog covered only the polls and probes until a fault-matrix encoder sat 600 s
        past a durable broker restart (CI, 2026-12-04) with its last log line a failed commit.
        Nested (``connect`` inside a watched region) the outer call's clock keeps running. One
        thread at a time: the helpers' calls (the keepalive's and the prefetch's polls, an
        overlapped ending's commit) run while the loop thread is in the handler,
        which makes no watched call, and each helper is joined before the next one."""
        outer = self.poll_since
        if outer is None:
            self.poll_since = time.monotonic()
        try:
            yield
        finally:
            if outer is None:
                self.poll_since = None

    def poll_hung(self) -> float | None:
        """Seconds the poll in progress has run, when that is past ``poll_hang_s``."""
        since = self.poll_since
        if since is not None and time.monotonic() - since > self.poll_hang_s:
            return time.monotonic() - since
        return None

    def keepalive(self, fn: Callable[[], Any], every_s: float = 1.0) -> Any:
        """Run one long, uninterruptible piece of work (a UMAP fit, a model forward) while a
        helper thread keeps the group membership alive; returns its result or raises its error.

        The work runs on the calling thread and the heartbeats on the helper, not the other
        way round: torch gives every thread that runs a CPU op its own OpenMP team, and with
        more OpenMP threads than cores libgomp shortens its spin, so a forward on a fresh
        thread beside the caller's team ran at ~0.8x (benchmarks/omp_threads.py). The helper
        has the consumer to itself: the work does not touch it, and the helper is joined
        before this returns. A poll is due ``every_s`` after the last one, whoever made it:
        many short calls in a row keep the membership as one long call does. Inside a handler
        whose next batch is being fetched (:meth:`_prefetching`), that fetch stops first; beside
        an overlapped ending (:meth:`_ending_beside`) it waits for the ending, then the fetch
        stops."""
        self._stop_helper()

        def beat(done: threading.Event) -> None:
            while not done.wait(every_s / 4):
                self.heartbeat_if_due(every_s)

        with self._helper_thread(beat, "keepalive-heartbeat"):
            out = fn()
        self.heartbeat_if_due(every_s)
        return out

    @contextmanager
    def _helper_thread(self, body: Callable[[threading.Event], None], name: str) -> Iterator[None]:
        """Run ``body(done)`` on a helper thread that has the consumer to itself until it
        returns or the block ends (``done`` is then set, and the helper joined)."""
        done = threading.Event()
        helper = threading.Thread(target=body, args=(done,), name=name, daemon=True)
        self._helper = (helper, done)
        helper.start()
        try:
            yield
        finally:
            self._stop_helper()

    def _helper_has_consumer(self) -> bool:
        """Whether a helper thread other than this one is using the consumer now."""
        h = self._helper
        return h is not None and h[0] is not threading.current_thread() and h[0].is_alive()

    def _stop_helper(self) -> None:
        h, self._helper = self._helper, None
        if h is not None:
            h[1].set()
            h[0].join()

    @contextmanager
    def _prefetching(self, limit: int) -> Iterator[None]:
        """While the block runs the handler, a helper thread polls the next batch (at most
        ``limit`` records, into ``_prefetched``) and then ends. The handler stays on this
        thread: torch gives each thread its own OpenMP team, and a forward beside another team
        ran at ~0.8x (benchmarks/omp_threads.py); the poll's parsing and decompression take
        a spare core, not the forward's thread. The helper does not keep the membership past
        its fetch: a handler that hangs must still lose its partitions after
        max_poll_interval, as before; long work asks for that with :meth:`keepalive`. A poll
        that fails leaves nothing fetched: the loop's own next poll meets the error."""
        if limit <= 0 or self.consumer is None or self._helper is not None:
            yield
            return
        with self._helper_thread(lambda stop: self._fetch_ahead(stop, limit), "prefetch"):
            yield

    def _fetch_ahead(self, stop: threading.Event, limit: int) -> None:
        """Poll (on a helper) until the next batch, at most ``limit`` records, is in
        ``_prefetched`` or ``stop`` is set."""
        try:
            while limit > 0 and not stop.is_set() and not self._prefetched:
                polled = self._poll(min(50, self.poll_timeout_ms), limit)
                self._prefetched = [r for part in polled.values() for r in part]
        except Exception as e:  # noqa: BLE001 - the loop's next poll meets it and decides
            log.debug("%s: prefetch poll failed: %s", self.bus.service, e)
        if self._prefetched and self.prepare is not None and not stop.is_set():
            self._prepare_ahead(self._prefetched)

    def _prepare_ahead(self, raws: list[Any]) -> None:
        """On the helper, after the fetch (the records are in ``_prefetched`` already, so
        nothing here can lose them): decode their envelopes for ``_begin`` and hand the
        messages to ``prepare``."""
        try:
            decoded = {(r.topic, r.partition, r.offset): (r, self._decode(r)) for r in raws}
            self._decoded_ahead = decoded
            self.prepare([d for _, d in decoded.values() if isinstance(d, Message)])
        except Exception as e:  # noqa: BLE001 - the handler does the work itself, and meets the error there
            metrics.PREPARE_FAILURES.labels(self.bus.service).inc()
            log.log(logging.DEBUG if self._prepare_failed else logging.WARNING,
                    "%s: preparing the next batch failed; its handler does that work: %s", self.bus.service, e)
            self._prepare_failed = True

    @contextmanager
    def _ending_beside(self, handled: _Handled, limit: int) -> Iterator[None]:
        """While the block runs the next batch's handler, a helper thread ends ``handled``
        (:meth:`_finish`: publish, flush, marks, commit) and then fetches up to ``limit``
        records of the batch after, as :meth:`_prefetching` does. What the ending raises is
        kept in ``_ending_error`` for the loop's thread (no fetch follows a failed ending)."""

        def end_then_fetch(stop: threading.Event) -> None:
            try:
                self._finish(handled)
            except BaseException as e:  # noqa: BLE001 - raised again on the loop's thread
                self._ending_error = e
                return
            self._fetch_ahead(stop, limit)

        with self._helper_thread(end_then_fetch, "ending"):
            yield

    def heartbeat_if_due(self, every_s: float = 1.0) -> None:
        """:meth:`heartbeat` when the last poll, or the last try, is ``every_s`` old: for work
        done in pieces. Never raises: whatever a heartbeat raises is logged and counted (it
        must neither end the helper thread unseen nor fail a batch whose work is done, which
        the loop would then split as poison)."""
        now = time.monotonic()
        if now - max(self.polled_at, self._beat_tried_at) < every_s:
            return
        self._beat_tried_at = now  # a broker that is away: one try per every_s, not per check
        try:
            self.heartbeat()
        except Exception as e:  # noqa: BLE001 - see above; KafkaError is handled inside
            metrics.ERRORS.labels(self.bus.service, type(e).__name__).inc()
            log.error("%s: heartbeat failed (%s); the batch goes on, its commit decides", self.bus.service, e)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT finish the current batch, commit, and exit the loop."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())

    def _decode(self, raw: Any) -> Message | DeadLetter:
        t = self.bus.logical(raw.topic)
        value = raw.value or b""
        try:
            rec = decode(value, t.record, self.bus.cfg.max_message_bytes)
        except Exception as e:  # noqa: BLE001 - whatever a message does to the decoder, it is that message's fault
            msg = Message(raw.topic, raw.partition, raw.offset, raw.timestamp, raw.key, value,
                          Record(id=f"{raw.topic}:{raw.partition}:{raw.offset}"))
            return DeadLetter(msg, f"invalid {t.record.SCHEMA}: {type(e).__name__}: {str(e)[:1000]}")
        return Message(raw.topic, raw.partition, raw.offset, raw.timestamp, raw.key, value, rec)

    def _handle(self, msgs: list[Message]) -> list[Output | DeadLetter]:
        try:
            return list(self.handler(msgs))
        except Exception as e:  # isolate the poison message
            if is_transient(e):
                raise
            if len(msgs) == 1:
                return [DeadLetter(msgs[0], "processing failed: " + traceback.format_exc(limit=3)[-1500:])]
            out: list[Output | DeadLetter] = []
            for m in msgs:
                out.extend(self._handle([m]))
            return out

    def _timed_handle(self, msgs: list[Message]) -> list[Output | DeadLetter]:
        """:meth:`_handle`, its time kept for the next turn's choice to fetch ahead."""
        t0 = time.perf_counter()
        try:
            return self._handle(msgs)
        finally:
            self._handler_s = time.perf_counter() - t0

    def _fetch_ahead_limit(self, taken: int, polled: int, max_messages: int | None) -> int:
        """How many records of the next batch to fetch while this one's handler runs: none
        without ``prefetch`` or after a handler quicker than ``prefetch_min_s``."""
        if not self.prefetch or self._handler_s < self.prefetch_min_s:
            return 0
        return self.batch_size if max_messages is None else min(self.batch_size, max_messages - taken - polled)

    def process_batch(self, raws: list[Any], prefetch: int = 0) -> int:
        """One turn of the loop over already-polled raw records, all but its commit; returns
        messages handled. ``prefetch``: fetch up to this many records of the next batch while
        the handler runs."""
        t0 = time.perf_counter()
        fresh, verdicts = self._begin(raws)
        if fresh:
            with self._prefetching(prefetch):
                verdicts.extend(self._timed_handle(fresh))
        self._end(_Handled(raws, fresh, verdicts, t0))
        return len(raws)

    def _begin(self, raws: list[Any], in_flight: frozenset[str] = frozenset()) -> tuple[list[Message], list]:
        """Decode a batch (what fails becomes a dead letter; a batch fetched ahead for
        ``prepare`` was decoded on the helper) and drop the inputs already done:
        those the done store has marked and ``in_flight``'s (the batch before, handled, its
        ending still under way). Returns (the fresh messages, the verdicts so far)."""
        if self.on_batch_start:
            self.on_batch_start()
        msgs: list[Message] = []
        verdicts: list[Output | DeadLetter] = []
        ahead, self._decoded_ahead = self._decoded_ahead, {}  # the helper that made it was joined
        for r in raws:
            fetched, d = ahead.get((r.topic, r.partition, r.offset), (None, None))
            if fetched is not r:  # not this very record (read again after a rewind): decode it here
                d = self._decode(r)
            (msgs if isinstance(d, Message) else verdicts).append(d)
        # An input re-sent within one batch (a producer retry) is handled once, like one
        # re-sent across batches: the first copy counts, the rest are duplicates.
        first: dict[str, Message] = {}
        for m in msgs:
            first.setdefault(f"{m.topic}:{m.record.id}", m)
        already = self.done.seen(list(first)) if self.done else set()
        fresh = [m for i, m in first.items() if i not in already and i not in in_flight]
        if len(fresh) < len(msgs):
            self._duplicates.inc(len(msgs) - len(fresh))
        return fresh, verdicts

    def _end(self, handled: _Handled) -> None:
        """Publish a handled batch's verdicts (outputs and dead letters), flush, and mark its
        fresh inputs done: the batch's turn but its commit. Raises if the flush fails: no mark."""
        raws, fresh, verdicts = handled.raws, handled.fresh, handled.verdicts
        t_pub = time.perf_counter()
        half = len(verdicts) // 2
        for i, v in enumerate(verdicts, 1):
            if isinstance(v, DeadLetter):
                m = v.message
                self.bus.dead_letter(m.topic, m.partition, m.offset, m.value, v.reason)
            else:
                self.bus.send(v)
            if i % self.flush_every == 0:  # a big batch (all heads of many samples) takes a while
                self.bus.flush()
                self.heartbeat()
            if i == half:
                failpoints.hit("mid-publish", before=self.bus.flush)  # a batch partly durable
        failpoints.hit("flush")
        self.bus.flush()  # raises on failure: no mark, no commit
        failpoints.hit("after-flush")  # the window between a batch's outputs and its marks
        if self.on_flushed:
            self.on_flushed()
        self._publish_s.inc(time.perf_counter() - t_pub)
        if self.done:
            self.done.mark([f"{m.topic}:{m.record.id}" for m in fresh])
        for topic, n in Counter(r.topic for r in raws).items():
            self._in[self.bus.logical(topic).name].inc(n)
        # with overlap_ending this ends a turn later: the time includes the next batch's turn
        self._processing_s.observe(time.perf_counter() - handled.t0)

    def _finish(self, handled: _Handled) -> None:
        """End a handled batch and commit it (overlap_ending: on the helper, beside the next
        batch's handler, or on the loop's thread when nothing follows it)."""
        self._end(handled)
        self._commit(handled.raws)
        if self._handled is handled:  # committed: nothing of it to rewind, whatever follows
            self._handled = None
        self._count(len(handled.raws))

    def _count(self, n: int) -> None:
        """``n`` inputs committed."""
        self.processed += n
        if self._progress:
            self._progress(n)

    def _overlapped_turn(self, raws: list[Any], ahead: int) -> None:
        """overlap_ending's turn: handle ``raws`` on this thread while a helper ends the batch
        before (publish, flush, marks, commit) and then fetches up to ``ahead`` records of the
        next; this batch's ending waits for the next turn (or for :meth:`_settle`). Raises what
        the handler or the ending raised; ``_handled`` then still holds an ending that failed,
        for the loop to rewind with ``raws``."""
        t0 = time.perf_counter()
        before = self._handled
        fresh, verdicts = self._begin(raws, before.ids() if before else frozenset())
        # with nothing to handle, a fetch beside it would overlap nothing
        beside = self._ending_beside(before, ahead) if before else self._prefetching(ahead if fresh else 0)
        try:
            with beside:
                if fresh:
                    verdicts.extend(self._timed_handle(fresh))
        except BaseException:
            if self._ending_error is not None:  # the handler's error goes up; the ending's is not lost
                metrics.ERRORS.labels(self.bus.service, type(self._ending_error).__name__).inc()
                log.error("%s: the last batch's ending failed too: %s", self.bus.service, self._ending_error,
                          exc_info=self._ending_error)
            raise
        finally:  # a failed ending stays in _handled, to be read again, whatever the handler did
            error, self._ending_error = self._ending_error, None
        if error is not None:
            raise error
        self._handled = _Handled(raws, fresh, verdicts, t0)

    def _settle(self) -> None:
        """overlap_ending: end and commit the batch still in hand, here (nothing to overlap it
        with: the input is quiet, or the loop stops)."""
        if self._handled is not None:
            self._finish(self._handled)

    def _in_hand(self) -> list[Any]:
        """The raw records of a batch handled but not committed (overlap_ending)."""
        return self._handled.raws if self._handled is not None else []

    def _take_prefetched(self) -> list[Any]:
        """The batch fetched while the last handler ran, less any partition that a rebalance
        during its heartbeats moved away (its new owner reads it from the committed offset)."""
        raws, self._prefetched = self._prefetched, []
        if not raws:
            return raws
        mine = self.consumer.assignment()
        return [r for r in raws if TopicPartition(r.topic, r.partition) in mine]

    def _retry_later(self, e: BaseException, raws: list[Any], backoff: float) -> float:
        """A batch failed retryably: nothing of it is committed. Read ``raws`` again, with any
        batch in hand whose ending failed (overlap_ending) and anything fetched ahead; wait
        ``backoff`` seconds. Returns the next backoff."""
        metrics.ERRORS.labels(self.bus.service, type(e).__name__).inc()
        log.error("batch failed, not committed, will retry: %s", e)
        if isinstance(e, KafkaError):  # a restarted broker may have lost the topics
            try:
                with self._watched():  # an admin request: it waits like the others
                    self.bus.ensure_topics()
            except Exception as again:  # noqa: BLE001 - still down: the retry loop waits
                log.debug("ensure_topics failed: %s", again)
        in_hand, self._handled = self._in_hand(), None
        self._rewind(in_hand + raws)
        self.stop_event.wait(backoff)
        return min(backoff * 2, 30)

    def _commit(self, raws: list[Any]) -> None:
        # each partition's last offset first, its TopicPartition and OffsetAndMetadata once:
        # 0.19 against 0.67 us a message making both per record (micro-timed, 90 records)
        last: dict[tuple[str, int], int] = {}
        for r in raws:
            key = (r.topic, r.partition)
            if last.get(key, -1) < r.offset:
                last[key] = r.offset
        offsets = {TopicPartition(t, p): OffsetAndMetadata(off + 1, "", -1) for (t, p), off in last.items()}
        with self._watched():
            self.consumer.commit(offsets)
        self._committed.update({tp: om.offset for tp, om in offsets.items()})
        if self.on_commit:
            self.on_commit({tp: om.offset for tp, om in offsets.items()})

    def _rewind(self, raws: list[Any]) -> None:
        """Seek back to the batch's first offsets, and past nothing fetched ahead of it."""
        raws, self._prefetched, self._decoded_ahead = raws + self._prefetched, [], {}
        first: dict[TopicPartition, int] = {}
        for r in raws:
            tp = TopicPartition(r.topic, r.partition)
            first[tp] = min(first.get(tp, r.offset), r.offset)
        assigned = self.consumer.assignment()
        for tp, off in first.items():
            if tp in assigned:  # a revoked partition restarts at its committed offset with its new owner
                self.consumer.seek(tp, off)

    def _observe_lag(self) -> None:
        """Hand this consumer's positions to the lag probe, at most every ``lag_every_s``, the
        first time ``lag_every_s`` into the run (:meth:`run` sets ``_lag_due``).

        Not on the first batch: the probe's start (a consumer of its own: bootstrap, metadata,
        offsets) took ~70 ms of a 2-core machine's CPU beside the loop, 9% of a 3,000-pattern
        consume (benchmarks/bus.py: ours/raw 0.85 with it, 0.94 without, same run). A stage
        shorter than ``lag_every_s`` never starts it; a lag gauge of a few seconds' age is what
        a Prometheus scrape sees anyway."""
        now = time.monotonic()
        if now < self._lag_due:
            return
        self._lag_due = now + self.lag_every_s
        positions = {}
        with self._watched():
            for tp in self.consumer.assignment():
                pos = self._committed.get(tp)
                if pos is None:
                    try:
                        pos = self.consumer.position(tp, timeout_ms=0)
                    except Exception:  # noqa: BLE001 - not known yet: skip it this time
                        pos = None
                if pos is not None:
                    positions[tp] = pos
        if positions:
            self._lag.observe(positions)

    def _ends_probe(self) -> KafkaConsumer:
        """One group-less consumer for this run's end-offset probes (made on first use, closed
        at the end of the run): a new one per probe cost a bootstrap and a metadata fetch."""
        if self._probe is None:
            self._probe = tail_probe(self.bus)
        return self._probe

    def _drop_probe(self) -> None:
        if self._probe is not None:
            self._probe.close(autocommit=False)
            self._probe = None

    def _positions_and_ends(self) -> dict[TopicPartition, tuple[int | None, int | None]]:
        """(position, confirmed end) per assigned partition; both None when the client cannot
        say within ``group_check_timeout_ms`` (a position not known yet is a lookup of the
        group's commit, which without a bound retries for as long as the coordinator is
        unknown: a broker that is away), the end None when the broker cannot say now."""
        assigned = list(self.consumer.assignment())
        with self._watched():
            try:
                ends = true_end_offsets(self.bus, assigned, self._ends_probe())
            except TRANSIENT as e:
                log.debug("end offsets unavailable: %s", e)
                self._drop_probe()  # a client that failed a request may be wedged: a new one next time
                ends = None
            state = {}
            for tp in assigned:
                pos = self.consumer.position(tp, timeout_ms=self.group_check_timeout_ms)
                state[tp] = (pos, None if pos is None or ends is None else ends.get(tp, 0))
            return state

    @staticmethod
    def _read_to_end(state: dict[TopicPartition, tuple[int | None, int | None]]) -> bool:
        """Every partition of ``state`` read to its confirmed end; true of none (a member of a
        group left with no partitions then counts every partition by the group's commits)."""
        return all(end is not None and pos >= end for pos, end in state.values())

    def _caught_up(self, state: dict[TopicPartition, tuple[int | None, int | None]] | None = None) -> bool:
        """This member has partitions, each read to its (confirmed) end (``state``: positions
        and ends already probed, else probed here)."""
        state = self._positions_and_ends() if state is None else state
        return bool(state) and self._read_to_end(state)

    def _others_left(self, mine: set[TopicPartition]) -> dict[TopicPartition, tuple[int, int]] | None:
        """The partitions of the inputs that this member does not own (``mine``) and that the
        group has not committed to their end: (committed, end) each. None when the broker
        cannot say now, or the topics' partitions are not known yet.

        A batch stage stops when this is empty and its own partitions are read, not on its
        own share alone: a partition held by a peer, or by a dead member until its session
        expires, is not done because this member's are. Every call here has a bound (a
        commit lookup without one retries for as long as the coordinator is unknown)."""
        names = list(map(self.bus.name, self.inputs))
        # the subscription's metadata cache: the public partitions_for_topic refreshes it
        # without a bound when a topic is missing from it
        known = {name: self.consumer._cluster.partitions_for_topic(name) for name in names}
        if not all(known.values()):
            return None
        others = [TopicPartition(n, p) for n in names for p in sorted(known[n]) if TopicPartition(n, p) not in mine]
        if not others:
            return {}
        try:
            with self._watched():
                ends = true_end_offsets(self.bus, others, self._ends_probe())
                committed = {tp: self.consumer.committed(tp, timeout_ms=self.group_check_timeout_ms) or 0
                             for tp in others}
        except TRANSIENT as e:
            log.debug("the group's commits unavailable: %s", e)
            self._drop_probe()
            return None
        return {tp: (committed[tp], ends.get(tp, 0)) for tp in others if committed[tp] < ends.get(tp, 0)}

    @staticmethod
    def _behind(state: dict[TopicPartition, tuple[int | None, int | None]]) -> bool:
        """The broker confirms records past some partition's position."""
        return any(end is not None and pos < end for pos, end in state.values())

    def _describe_client(self) -> str:
        """What kafka-python's consumer believes about its group and its broker connections."""
        try:
            co, mgr = self.consumer._coordinator, self.consumer._manager
            return (f"coordinator={co.coordinator_id} state={co.state} lookup_pending="
                    f"{co._find_coordinator_future is not None} backoff={sorted(map(str, mgr._backoff))} "
                    f"connections={ {k: c.connected for k, c in mgr._conns.items()} }")
        except Exception as e:  # noqa: BLE001 - private attributes of another library: best effort
            return f"(client state unavailable: {type(e).__name__})"

    def _stalled_error(self, quiet_s: float, why: str,
                       state: dict[TopicPartition, tuple[int | None, int | None]]) -> ConsumerStalled:
        """Log where every partition stands (``state``, as just probed) and what the client
        believes, and count it: the next stall is then diagnosed from the log, not reproduced."""
        metrics.CONSUMER_STALLED.labels(self.bus.service).inc()
        where = _by_name(state)
        msg = (f"{self.bus.service}: nothing fetched for {quiet_s:.0f} s, {why} (position, end): {where}; "
               f"client: {self._describe_client()}")
        log.error("%s; stopping so that the process starts again", msg)
        return ConsumerStalled(msg)

    def connect(self) -> KafkaConsumer:
        """The group consumer on the inputs (made once; ``run`` calls this)."""
        if self.consumer is None:
            with self._watched():  # the bootstrap waits on the client's IO thread like a poll
                self.consumer = self.bus.consumer(self.group, self.inputs, listener=_OffsetsWatch(self))
        return self.consumer

    def run(self, max_messages: int | None = None, idle_timeout_s: float | None = None,
            progress: Callable[[int], Any] | None = None, until_caught_up: bool = False) -> int:
        """Loop until stopped, ``max_messages`` handled, or idle for ``idle_timeout_s``: nothing
        arrived for that long *and* every assigned partition is read to its end.

        The idle clock starts when the group first assigns this member partitions, not when
        the run starts: joining a group can take longer than a short idle timeout on a loaded
        machine, and a stage that timed out before its first poll silently did nothing.
        ``until_caught_up``: also stop as soon as every partition of the inputs is read to its
        end by the group (a batch stage that runs after its producers finished: no idle wait at
        the end). A member whose own partitions are read waits, neither idle nor stalled, while
        the group's other members read theirs (:meth:`_others_left`); short of its own end it
        waits, or stalls, as below. ``progress(n)`` is called with each committed batch's size
        (a progress bar's update; with overlap_ending a turn later, from either thread: the
        helper's while the next batch is handled, so it must not share state with the handler).

        Nothing arrived while the input is not read to its end is not idleness: the broker is
        away (kafka-python's poll returns nothing while disconnected), the group is rejoining,
        or the consumer is wedged. A consumer that fetched nothing for ``stall_after_s`` while
        the broker confirms records past its positions raises :class:`ConsumerStalled`, and so
        does a stage with an idle timeout that waited max(3 idle timeouts, 2 min) for a broker
        that did not come back (both after flushing; each logs every partition's position and
        end)."""
        self.connect()
        svc = self.bus.service
        self._progress = progress
        started = last_data = time.monotonic()
        self._lag_due = started + self.lag_every_s
        joined = False
        stalled: ConsumerStalled | None = None
        next_check = 0.0  # the next time the quiet input's ends are probed (a broker round trip)
        next_group_check = next_wait_log = 0.0  # until_caught_up: the group's other partitions
        others_seen, others_since = None, 0.0  # ... as last probed, and since when unchanged
        backoff = 0.5
        try:
            while not self.stop_event.is_set():
                taken = self.processed + len(self._in_hand())  # handled, committed or not
                if max_messages is not None and taken >= max_messages:
                    break
                limit = self.batch_size
                if max_messages is not None:
                    limit = min(limit, max_messages - taken)
                raws: list[Any] = []
                try:
                    raws = self._take_prefetched()
                    if not raws:
                        polled = self._poll(self.poll_timeout_ms, limit)
                        raws = [r for part in polled.values() for r in part]
                    if self._assigned_now:
                        self._check_vanished_offsets()
                except TRANSIENT as e:  # the broker is away: keep the process, wait, poll again
                    metrics.ERRORS.labels(svc, type(e).__name__).inc()
                    log.error("poll failed, will retry: %s", e)
                    if raws:  # fetched, the position past them, not handled: read them again
                        self._rewind(raws)
                    self.stop_event.wait(backoff)
                    backoff = min(backoff * 2, 30)
                    continue
                if not joined and self.consumer.assignment():
                    joined, last_data = True, time.monotonic()
                if not raws and self._handled is not None:
                    try:  # nothing to overlap the batch in hand with: end and commit it here
                        self._settle()
                    except TRANSIENT as e:
                        backoff = self._retry_later(e, [], backoff)
                    continue
                if not raws:
                    now = time.monotonic()
                    if joined and until_caught_up and now >= next_group_check:
                        next_group_check = now + self.group_check_every_s
                        state = self._positions_and_ends()
                        if self._read_to_end(state):
                            left = self._others_left(set(state))
                            if left == {}:
                                break  # the group has read every partition to its end
                            if left:  # waiting on the group's other members is neither idle nor a stall...
                                last_data = now
                                if left != others_seen:
                                    others_seen, others_since = left, now
                                others = _by_name(left)
                                if now - others_since > self.peers_stall_s:  # ...until they commit nothing
                                    stalled = self._stalled_error(
                                        now - others_since, f"and the group's other members committed nothing of "
                                        f"their partitions (committed, end): {others}; of its own", state)
                                    break
                                if now >= next_wait_log:
                                    next_wait_log = now + 60
                                    log.info("%s: its partitions %s are read; waiting for the group's others "
                                             "(committed, end): %s", svc,
                                             sorted(_by_name(state)), others)
                                continue
                    quiet = now - (last_data if joined else started)
                    # never joined: the join itself gets a generous bound (4x), plus two sessions:
                    # a member that stopped here just before is evicted only when its session
                    # expires (consumers leave by going silent: Bus.consumer)
                    idle = idle_timeout_s is not None and quiet > (
                        idle_timeout_s if joined else 4 * idle_timeout_s + 2 * self.bus.session_timeout_ms / 1000)
                    if not joined:
                        if idle:
                            log.warning("%s: no partitions assigned to group %s after %.0f s; stopping",
                                        svc, self.group, quiet)
                            break
                        continue
                    if not (idle or quiet > self.stall_after_s) or now < next_check:
                        continue
                    # one probe of the ends (a broker round trip) per idle timeout at most
                    next_check = now + min(idle_timeout_s or self.stall_after_s, self.stall_after_s)
                    state = self._positions_and_ends()
                    if idle and self._caught_up(state) and not until_caught_up:
                        break  # idle: nothing arrived and nothing is left to read (of its own: a
                        # batch stage stops only on the group's end, above)
                    if quiet > self.stall_after_s and self._behind(state):
                        stalled = self._stalled_error(quiet, "while the broker confirms records past it", state)
                        break
                    if not idle:
                        continue
                    if quiet < max(3 * idle_timeout_s, 120):
                        log.warning("%s: nothing arrived for %.0f s, but the input is not read to its end "
                                    "(broker away or group rejoining?); waiting", svc, quiet)
                        continue
                    # stopping "idle" here returned success with the input unread (exit 0, 19
                    # of 24 files lost in the fault matrix): it is an error, and a restart
                    stalled = self._stalled_error(quiet, "and the input is not read to its end", state)
                    break
                last_data = time.monotonic()
                others_seen = None  # data again (a rebalance moved partitions here): a wait after it starts anew
                ahead = self._fetch_ahead_limit(taken, len(raws), max_messages)
                try:
                    if self.overlap_ending:
                        self._overlapped_turn(raws, ahead)
                    else:
                        self.process_batch(raws, prefetch=ahead)
                        self._commit(raws)
                        self._count(len(raws))
                    backoff = 0.5
                except TRANSIENT as e:
                    backoff = self._retry_later(e, raws, backoff)
                # quiet counts from the end of the last batch: a batch of long forward passes
                # must not make the next empty poll look like a stalled consumer
                last_data = time.monotonic()
                self._observe_lag()
            try:
                self._settle()
            except TRANSIENT as e:  # stopping: the next run (or the partition's next owner) reads it again
                metrics.ERRORS.labels(svc, type(e).__name__).inc()
                log.error("%s: the last batch could not be committed, it will be read again: %s", svc, e)
        finally:
            # a batch in hand, or fetched ahead, was not committed: the next run (or the
            # partition's next owner) reads it from the committed offset, not from this object
            self._handled, self._prefetched, self._decoded_ahead = None, [], {}
            # one watched call each: their own bounds (probe close ~30 s, a flush of 30 s per
            # producer, the close 30 s) summed in one clock could pass poll_hang_s while the
            # broker is away and start the process again for no hang
            self._lag.close()
            with self._watched():
                self._drop_probe()
            try:
                with self._watched():
                    self.bus.flush(30)
            finally:
                with self._watched():
                    self.consumer.close(autocommit=False)
                self.consumer = None
        if stalled is not None:
            raise stalled
        return self.processed


@dataclass
class _Handled:
    """A batch whose handler ran: its raw records, the fresh messages handed to the handler,
    the verdicts to publish, and when its turn began (for the processing-time metric)."""

    raws: list[Any]
    fresh: list[Message]
    verdicts: list[Output | DeadLetter]
    t0: float

    def ids(self) -> frozenset[str]:
        """The done-store ids of its fresh inputs."""
        return frozenset(f"{m.topic}:{m.record.id}" for m in self.fresh)


def _by_name(per_partition: dict[TopicPartition, Any]) -> dict[str, Any]:
    """``per_partition`` keyed "topic[partition]", as the stall and wait logs print it."""
    return {f"{tp.topic}[{tp.partition}]": v for tp, v in per_partition.items()}


class _OffsetsWatch(ConsumerRebalanceListener):
    def __init__(self, processor: Processor):
        self.processor = processor

    def on_partitions_revoked(self, revoked) -> None:
        pass

    def on_partitions_assigned(self, assigned) -> None:
        self.processor.on_partitions_assigned(assigned)
