"""Measured fixes to kafka-python 3.0's network path, installed when the bus is imported.

kafka-python is the product's client and stays it; these replace some of its inner functions
with ones that give the same bytes and, where measured (below), less CPU for large records
(a pattern is 65.8 KB):

1. **Socket reads.** ``KafkaTCPTransport._sock_recv`` reads the socket 4 KiB at a time: a
   pattern costs 17 ``recv`` calls, 17 bytes objects and a join. :func:`sock_recv` reads up to
   256 KiB a call (what the kernel has ready; small responses still take one call). TLS
   connections keep kafka-python's read (``KafkaSSLTransport`` has its own).
2. **zstd batches.** ``kafka.codec.zstd_decode`` decompresses through a streaming reader
   that grows its output as it goes. :func:`zstd_decode` decompresses a one-frame batch that
   states its content size (kafka-python's producer writes it; a batch the broker recompressed
   or Java's producer wrote may not) in one call into an output of exactly that size, and
   hands anything else (several frames, no stated size, more than 64 MiB stated, a payload
   too short for a header) to kafka-python's own function, so every batch decodes as before.
3. **Response bodies.** A response is decoded from ``KafkaBytes.read()``, which slices the
   receive buffer (a copy) and then copies the slice into bytes: every fetched byte twice.
   :func:`kafka_bytes_read` makes the one copy, through a memoryview (same bytes, same
   position). A CPU-weighted stack sample of the consume path (2026-12-06, 6 rounds x 3,000
   patterns; one diagnostic run, coarse attribution) put 29-30% of the consume's CPU in that
   method's own lines, with the allocator untuned, which magnifies it: with it tuned, as the
   services run, the copy saved is ~28 us a MiB (micro-timed).
4. **Socket registration.** kafka-python's IO thread registers a socket with its selector
   for each wait and unregisters it after, and ``register_event`` finds it unregistered by
   the KeyError of ``selector.get_key(sock)``, whose message the standard library formats with
   ``repr(sock)``, twice: a ``getsockname`` and a ``getpeername`` each time, 7-8% of the same
   (one-run) profile. :func:`register_event` asks by descriptor number (a KeyError of an int) and
   registers; a socket already registered (or closed) takes kafka-python's own method.
5. **Wake-ups.** A thread that hands the IO loop work (a producer's ``send`` when a batch
   fills, a consumer's request) wakes it by writing a byte to a socketpair, each time: a
   ``send`` syscall and a GIL hand-off to the loop. kafka-python counts an append as filling
   a batch whenever more than one batch waits for its partition, which, with the broker
   slower than the sends, is nearly always: 2,841 of 3,000 pattern sends woke the loop
   (counted, 2026-12-06). :func:`wakeup` writes the byte only when none is waiting: one
   written and not yet drained wakes the loop anyway (or is about to be written by the thread
   that set the flag), and the flag is cleared by :func:`process_events` only after the
   loop drained the byte, before the loop runs its ready tasks and returns from its poll: work
   handed over before the clear is seen in that pass, work handed over after it writes a byte
   again. The flag carries the install it was set under: one left set by a loop that drained
   with kafka-python's own method in between (``uninstall``) is ignored after ``install``.

Measured (``benchmarks/consume_path.py``, ``benchmarks/produce_path.py``): the same consumer
reading, and our producer sending, the same patterns, the client as shipped vs with these
fixes, paired rounds (their "stock" side is :func:`uninstall`); the figures are in the
README's Throughput section. ``APMAE_STOCK_KAFKA=1`` leaves the client as shipped (a way out
if a kafka-python release changes these functions: :func:`install` also refuses any release
but those in ``WRITTEN_FOR``, whose code these were written against).
"""

from __future__ import annotations

import logging
import os
import selectors
import threading

import kafka
import kafka.codec
import kafka.errors
import kafka.net.selector
import kafka.net.transport
import kafka.protocol.frame
import kafka.record.default_records
import zstandard

log = logging.getLogger("apmae.bus")

RECV_BYTES = 256 * 1024
# The one-call decode allocates the size a frame's header states before it reads a byte; a
# corrupt or hostile header could state gigabytes. Larger frames (a real batch is a few MB:
# requests are capped at 4 MB and patterns compress 1.25x) take kafka-python's streaming path.
ONE_CALL_MAX_BYTES = 64 << 20
# The kafka-python releases whose functions these were compared with (line by
# line, and by tests/unit/test_kafka_fixes.py); any other runs as shipped, with a warning.
WRITTEN_FOR = ("3.0.12",)
_stock: dict[str, object] = {}  # what install() replaced, for uninstall()
_installs = [0]  # how many times install() put the fixes in place
_local = threading.local()  # one ZstdDecompressor a thread: they are not thread-safe


def sock_recv(self) -> tuple[bytes, Exception | None]:
    """``KafkaTCPTransport._sock_recv`` with 256 KiB reads: everything the socket has ready,
    and the error that ended the read (a disconnect or a socket error), as kafka-python's."""
    received = []
    err = None
    while True:
        try:
            data = self._sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            break
        except BaseException as e:  # noqa: BLE001 - kafka-python's own contract: any error closes
            log.exception("%s: Error receiving network data closing socket", self)
            err = kafka.errors.KafkaConnectionError(e)
            break
        if not data:
            log.error("%s: socket disconnected", self)
            err = kafka.errors.KafkaConnectionError("socket disconnected")
            break
        received.append(data)
    return (received[0] if len(received) == 1 else b"".join(received)), err


def zstd_decode(payload: bytes) -> bytes:
    """A zstd record batch's records: one call into an exact-size output when the batch is one
    frame that states its size, else kafka-python's streaming decode (same bytes either way)."""
    try:  # a payload shorter than a frame header has no size: kafka-python's answer for it
        size = zstandard.frame_content_size(payload)
    except zstandard.ZstdError:
        size = -1
    if 0 < size <= ONE_CALL_MAX_BYTES:  # 0: an empty frame, maybe before another: stream it
        d = getattr(_local, "zstd", None)
        if d is None:
            d = _local.zstd = zstandard.ZstdDecompressor()
        try:  # refuses a second frame (allow_extra_data) rather than dropping it
            return d.decompress(payload, read_across_frames=False, allow_extra_data=False)
        except zstandard.ZstdError:
            pass
    return kafka.codec.zstd_decode(payload)  # kafka-python's own (install() patches the record module's name)


def kafka_bytes_read(self: kafka.protocol.frame.KafkaBytes, nbytes: int | None = None) -> bytes:
    """``KafkaBytes.read``: the next ``nbytes`` (all that is left when None) as bytes, the
    position moved past them, in one copy rather than kafka-python's slice-then-bytes two."""
    start = self._idx
    stop = len(self) if nbytes is None else min(start + nbytes, len(self))
    self._idx = stop
    with memoryview(self) as view, view[start:stop] as part:  # released: a live view forbids resizing the buffer
        return bytes(part)


def register_event(self: kafka.net.selector.NetworkSelector, fileobj, event: int, task) -> None:
    """``NetworkSelector.register_event`` for its common case, a socket not registered yet,
    looked up by descriptor number: a miss then raises (inside ``Mapping.get``) a KeyError
    naming an int, not one naming ``repr(sock)`` twice (four syscalls). Anything else, a socket
    registered for the other event, a closed one, a selector that is closed, takes
    kafka-python's own method, which also raises its errors."""
    fd = fileobj if isinstance(fileobj, int) else getattr(fileobj, "fileno", lambda: -1)()
    keys = self._selector.get_map()
    if fd < 0 or keys is None or keys.get(fd) is not None:
        _stock["register_event"](self, fileobj, event, task)
        return
    if not isinstance(task, kafka.net.selector.Task):
        task = kafka.net.selector.Task(task)
    self._selector.register(fileobj, event, (task, None) if event == selectors.EVENT_READ else (None, task))


def wakeup(self: kafka.net.selector.NetworkSelector) -> None:
    """``NetworkSelector.wakeup`` that writes its byte only when no byte of it is waiting to be
    drained: ``_wake_pending`` holds the install it was set under, cleared by
    :func:`process_events` after the drain."""
    if getattr(self, "_wake_pending", None) == _installs[0]:
        return
    self._wake_pending = _installs[0]
    try:
        self._wakeup_w.send(b"\x00")
    except BlockingIOError:  # the socketpair is full of wake-up bytes: the loop will wake
        pass
    except OSError:  # closed, which kafka-python ignores: nothing written, nothing waits
        self._wake_pending = None
    except BaseException:  # nothing written either: the next wake-up must write
        self._wake_pending = None
        raise


def process_events(self: kafka.net.selector.NetworkSelector, event_list) -> None:
    """``NetworkSelector._process_events``, then, when the wake-up socket was among the events
    (kafka-python has drained it), the flag cleared: wake-ups from here on write again."""
    woken = any(key.fileobj is self._wakeup_r for key, _ in event_list)
    try:
        _stock["process_events"](self, event_list)
    finally:
        if woken:
            self._wake_pending = None


def rebuild_wakeup_socketpair(self: kafka.net.selector.NetworkSelector) -> None:
    """``NetworkSelector._rebuild_wakeup_socketpair``: a new, empty pair, so no byte waits."""
    _stock["rebuild_wakeup_socketpair"](self)
    self._wake_pending = None


# (module, attribute, the fix) for each replacement: install() saves what it replaces
_FIXES = (
    (kafka.net.transport.KafkaTCPTransport, "_sock_recv", sock_recv),
    (kafka.record.default_records, "zstd_decode", zstd_decode),
    (kafka.protocol.frame.KafkaBytes, "read", kafka_bytes_read),
    (kafka.net.selector.NetworkSelector, "register_event", register_event),
    (kafka.net.selector.NetworkSelector, "wakeup", wakeup),
    (kafka.net.selector.NetworkSelector, "_process_events", process_events),
    (kafka.net.selector.NetworkSelector, "_rebuild_wakeup_socketpair", rebuild_wakeup_socketpair),
)


def install() -> bool:
    """Put the fixes in place (idempotent); False, and the client untouched, when
    ``APMAE_STOCK_KAFKA=1`` or kafka-python is not a release these were checked against."""
    if os.environ.get("APMAE_STOCK_KAFKA") == "1":
        return False
    if kafka.__version__ not in WRITTEN_FOR:
        log.warning("kafka-python %s: its network path is not the one services/bus/kafka_fixes.py was "
                    "written for; running it as shipped", kafka.__version__)
        return False
    if not _stock:
        _installs[0] += 1  # a wake-up flag set under an earlier install is stale: see wakeup
        for owner, name, fix in _FIXES:
            _stock[fix.__name__] = getattr(owner, name)
            setattr(owner, name, fix)
    return True


def uninstall() -> None:
    """The client as shipped again (the benchmark's stock rounds)."""
    if _stock:
        for owner, name, fix in _FIXES:
            setattr(owner, name, _stock.pop(fix.__name__))


def installed() -> bool:
    return bool(_stock)
