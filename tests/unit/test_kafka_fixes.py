"""services/bus/kafka_fixes.py: the replacements give kafka-python's bytes, state and errors, with
fewer socket reads, no streaming decode where a batch allows it, one copy of a response body
instead of two, and no socket repr to register a socket."""

from __future__ import annotations

import selectors
import socket
import threading
from collections.abc import Iterator

import kafka.codec
import kafka.errors
import kafka.net.selector
import kafka.net.transport
import kafka.protocol.frame
import kafka.record.default_records
import pytest
import zstandard
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder

from services.bus import kafka_fixes

pytestmark = pytest.mark.unit


class _Transport:  # what sock_recv reads off its transport: the socket
    def __init__(self, sock):
        self._sock = sock


def _ready_pair(payload: bytes) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.sendall(payload)  # small payloads only: a socketpair holds what its buffers allow
    b.setblocking(False)
    return a, b


def test_the_bus_installs_every_fix():
    import services.bus  # noqa: F401 - importing the bus installs them

    assert kafka_fixes.installed()
    assert kafka.net.transport.KafkaTCPTransport._sock_recv is kafka_fixes.sock_recv
    assert kafka.record.default_records.zstd_decode is kafka_fixes.zstd_decode
    assert kafka.protocol.frame.KafkaBytes.read is kafka_fixes.kafka_bytes_read
    assert kafka.net.selector.NetworkSelector.register_event is kafka_fixes.register_event
    assert kafka.net.selector.NetworkSelector.wakeup is kafka_fixes.wakeup
    assert kafka.net.selector.NetworkSelector._process_events is kafka_fixes.process_events
    assert kafka.net.selector.NetworkSelector._rebuild_wakeup_socketpair is kafka_fixes.rebuild_wakeup_socketpair


def test_uninstall_restores_kafka_python_and_install_is_idempotent(monkeypatch):
    stock_recv = kafka_fixes._stock["sock_recv"]
    stock_read, stock_register = kafka_fixes._stock["kafka_bytes_read"], kafka_fixes._stock["register_event"]
    kafka_fixes.uninstall()
    try:
        assert kafka.net.transport.KafkaTCPTransport._sock_recv is stock_recv
        assert kafka.record.default_records.zstd_decode is kafka.codec.zstd_decode
        assert kafka.protocol.frame.KafkaBytes.read is stock_read is not kafka_fixes.kafka_bytes_read
        assert kafka.net.selector.NetworkSelector.register_event is stock_register
        assert all(getattr(owner, name) is not fix for owner, name, fix in kafka_fixes._FIXES)
        monkeypatch.setenv("APMAE_STOCK_KAFKA", "1")
        assert not kafka_fixes.install() and not kafka_fixes.installed()
        monkeypatch.delenv("APMAE_STOCK_KAFKA")
        assert kafka_fixes.install() and kafka_fixes.install()
        assert kafka_fixes._stock["sock_recv"] is stock_recv  # not the fix saved as "stock"
    finally:
        kafka_fixes.install()


class _Ready:
    """A non-blocking socket with ``data`` ready: recv hands out what is asked for, as the
    kernel does, then raises BlockingIOError. (A socketpair holds only what its buffers allow:
    ~420 KB at Linux's default limits, so 1 MiB could not be made ready in one.)"""

    def __init__(self, data: bytes):
        self.data, self.at, self.calls = data, 0, 0

    def recv(self, n: int) -> bytes:
        self.calls += 1
        if self.at == len(self.data):
            raise BlockingIOError
        self.at += n
        return self.data[self.at - n:self.at]


def test_sock_recv_reads_what_is_ready_in_few_calls():
    payload = bytes(range(256)) * 4096  # 1 MiB
    ready = _Ready(payload)
    got, err = kafka_fixes.sock_recv(_Transport(ready))
    assert err is None and type(got) is bytes and got == payload
    # 4 reads of 256 KiB and the one that finds the socket empty; kafka-python's 4 KiB reads take 257
    assert ready.calls == len(payload) // kafka_fixes.RECV_BYTES + 1
    stock = _Ready(payload)
    got, err = kafka_fixes._stock["sock_recv"](_Transport(stock))
    assert err is None and got == payload and stock.calls == len(payload) // 4096 + 1


def test_sock_recv_reads_a_real_socket_whole():
    payload = bytes(range(256)) * 512  # 128 KiB: fits a socketpair's buffers at any default
    a, b = _ready_pair(payload)
    try:
        got, err = kafka_fixes.sock_recv(_Transport(b))
        assert err is None and got == payload
    finally:
        a.close()
        b.close()


def test_sock_recv_reports_a_closed_peer_as_kafka_python_does():
    results = []
    for recv in (kafka_fixes.sock_recv, kafka_fixes._stock["sock_recv"]):
        a, b = _ready_pair(b"last bytes")
        a.close()
        try:
            results.append(recv(_Transport(b)))
        finally:
            b.close()
    (got, err), (stock_got, stock_err) = results
    assert got == stock_got == b"last bytes"  # what came before the close is handed on with the error
    assert isinstance(err, kafka.errors.KafkaConnectionError) and type(err) is type(stock_err)


def test_sock_recv_turns_a_socket_error_into_a_connection_error():
    class Broken:
        def recv(self, n):
            raise ConnectionResetError("reset by peer")

    got, err = kafka_fixes.sock_recv(_Transport(Broken()))
    assert got == b"" and isinstance(err, kafka.errors.KafkaConnectionError)


def test_sock_recv_keeps_reading_while_a_writer_streams():
    a, b = socket.socketpair()
    payload = b"x" * (3 << 20)
    writer = threading.Thread(target=a.sendall, args=(payload,))
    writer.start()
    got = bytearray()
    try:
        b.setblocking(False)
        while len(got) < len(payload):
            data, err = kafka_fixes.sock_recv(_Transport(b))
            assert err is None
            got += data
    finally:
        writer.join()
        a.close()
        b.close()
    assert bytes(got) == payload


def _frames() -> dict[str, bytes]:
    blob = bytes(range(256)) * 600
    one = zstandard.ZstdCompressor().compress(blob)
    streaming = zstandard.ZstdCompressor().compressobj()
    return {"one frame": one,
            "two frames": one + zstandard.ZstdCompressor().compress(b"tail" * 100),
            "an empty frame, then another": zstandard.ZstdCompressor().compress(b"") + one,
            "a streaming frame without its size": streaming.compress(blob) + streaming.flush()}


def _count_fallbacks(monkeypatch) -> list:
    """Each call of kafka-python's own zstd decode (the fallback) appends to the list returned."""
    calls, stock = [], kafka.codec.zstd_decode
    monkeypatch.setattr(kafka.codec, "zstd_decode", lambda p: calls.append(1) or stock(p))
    return calls


@pytest.mark.parametrize("kind", ["one frame", "two frames", "an empty frame, then another",
                                  "a streaming frame without its size"])
def test_zstd_decode_gives_kafka_pythons_bytes(kind, monkeypatch):
    payload = _frames()[kind]
    want = kafka.codec.zstd_decode(payload)
    fallbacks = _count_fallbacks(monkeypatch)
    assert kafka_fixes.zstd_decode(payload) == want
    # one call into an exact-size output only for the frame that states its size; the rest
    # go to kafka-python's streaming decode, which reads across frames
    assert len(fallbacks) == (0 if kind == "one frame" else 1)


@pytest.mark.parametrize("payload", [b"", b"\x28\xb5\x2f", b"\x28\xb5\x2f\xfd\x00\x48"])
def test_zstd_decode_of_a_payload_shorter_than_a_frame_header_is_kafka_pythons(payload):
    # no size to read: kafka-python's decode answers (b"" here), not a new error
    assert kafka_fixes.zstd_decode(payload) == kafka.codec.zstd_decode(payload)


def test_zstd_decode_streams_a_frame_that_states_more_than_the_one_call_cap(monkeypatch):
    # a header's stated size is allocated before a byte is read: past the cap, the streaming path
    payload = _frames()["one frame"]
    monkeypatch.setattr(kafka_fixes, "ONE_CALL_MAX_BYTES", zstandard.frame_content_size(payload) - 1)
    want = kafka.codec.zstd_decode(payload)
    fallbacks = _count_fallbacks(monkeypatch)
    assert kafka_fixes.zstd_decode(payload) == want and fallbacks == [1]


def test_tls_connections_keep_kafka_pythons_own_read():
    assert kafka.net.transport.KafkaSSLTransport._sock_recv is not kafka_fixes.sock_recv


def _damaged() -> dict[str, bytes]:
    good = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(range(256)) * 600)
    mid = len(good) // 2
    return {"a flipped byte": good[:mid] + bytes([good[mid] ^ 0xFF]) + good[mid + 1:],
            "a broken frame header": b"\0\0\0\0" + good[4:],
            "a truncated frame": good[:-10]}


@pytest.mark.parametrize("kind", ["a flipped byte", "a broken frame header"])
def test_zstd_decode_of_a_corrupt_batch_raises_as_kafka_pythons(kind):
    bad = _damaged()[kind]
    with pytest.raises(zstandard.ZstdError):
        kafka.codec.zstd_decode(bad)
    with pytest.raises(zstandard.ZstdError):
        kafka_fixes.zstd_decode(bad)


def test_zstd_decode_of_a_truncated_batch_is_whatever_kafka_pythons_is():
    # the one-shot call refuses a frame that ends early; the fallback then gives kafka-python's
    # own answer (its streaming reader returns what it could decode), so nothing changes here
    bad = _damaged()["a truncated frame"]
    assert kafka_fixes.zstd_decode(bad) == kafka.codec.zstd_decode(bad)


@pytest.mark.parametrize("compression", [0, 4])  # none, zstd
def test_record_batches_read_the_same_with_and_without_the_fixes(compression):
    values = [bytes([i % 251]) * (65_000 + i) for i in range(12)] + [b"", None]
    builder = MemoryRecordsBuilder(magic=2, compression_type=compression, batch_size=1 << 22)
    for i, v in enumerate(values):
        builder.append(timestamp=1_700_000_000_000 + i, key=f"k{i}".encode(), value=v,
                       headers=[("id", f"{i}".encode())])
    builder.close()
    wire = bytes(builder.buffer())

    def read() -> list:
        records, out = MemoryRecords(wire), []
        while (batch := records.next_batch()) is not None:
            out += [(r.offset, r.timestamp, r.key, r.value, r.headers) for r in batch]
        return out

    assert kafka_fixes.installed()
    fixed = read()
    kafka_fixes.uninstall()
    try:
        stock = read()
    finally:
        kafka_fixes.install()
    assert fixed == stock and [v for *_, v, _ in fixed] == values


def _buffer(data: bytes) -> kafka.protocol.frame.KafkaBytes:
    buf = kafka.protocol.frame.KafkaBytes(len(data))
    buf.write(data)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("reads", [[None], [4, None], [3, 5, 100, None, 2], [0, 7, 0], [20, 1], [-3], [5, -2, None]])
def test_kafka_bytes_read_gives_kafka_pythons_bytes_and_positions(reads):
    data = bytes(range(17))
    fixed, stock = _buffer(data), _buffer(data)
    for n in reads:
        got, want = kafka_fixes.kafka_bytes_read(fixed, n), kafka_fixes._stock["kafka_bytes_read"](stock, n)
        assert type(got) is bytes and got == want and fixed.tell() == stock.tell()


def test_kafka_bytes_read_leaves_no_view_of_the_buffer_behind():
    buf = _buffer(b"abcdef")
    assert kafka_fixes.kafka_bytes_read(buf, 3) == b"abc"
    buf.extend(b"g")  # a bytearray with a live export refuses to resize (BufferError)
    assert kafka_fixes.kafka_bytes_read(buf) == b"defg"


@pytest.fixture
def net() -> Iterator[kafka.net.selector.NetworkSelector]:
    """A kafka-python IO loop's selector (not running), closed after the test: its wake-up
    pair and its epoll (kafka-python's close; after a test's own close of the epoll too)."""
    selector = kafka.net.selector.NetworkSelector()
    yield selector
    selector.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _task():
    def coro():
        yield

    return kafka.net.selector.Task(coro())


@pytest.mark.parametrize("register", ["fixed", "stock"])
def test_register_event_registers_as_kafka_pythons(register, net, pair, monkeypatch):
    fn = kafka_fixes.register_event if register == "fixed" else kafka_fixes._stock["register_event"]
    reprs = []
    monkeypatch.setattr(socket.socket, "__repr__", lambda s: reprs.append(1) or "<socket>")
    a = pair[0]

    def coro():
        yield

    fn(net, a, selectors.EVENT_READ, coro())  # not registered: the fix's own path
    # kafka-python finds an unregistered socket by a KeyError that formats repr(sock),
    # twice (a getsockname and a getpeername each); the fix asks by descriptor number
    assert len(reprs) == (0 if register == "fixed" else 2)
    key = net._selector.get_key(a)
    reader, writer = key.data[0], _task()
    assert isinstance(reader, kafka.net.selector.Task)  # a bare coroutine is made a Task, as kafka-python does
    assert key.events == selectors.EVENT_READ and key.data == (reader, None)
    fn(net, a, selectors.EVENT_WRITE, writer)  # registered for reading: kafka-python's
    key = net._selector.get_key(a)
    assert key.events == selectors.EVENT_READ | selectors.EVENT_WRITE and key.data == (reader, writer)
    with pytest.raises(RuntimeError, match="EVENT_READ already registered"):
        fn(net, a, selectors.EVENT_READ, _task())
    net.unregister_event(a, selectors.EVENT_READ)
    net.unregister_event(a, selectors.EVENT_WRITE)
    reprs.clear()
    fn(net, a, selectors.EVENT_WRITE, writer)  # unregistered again, for the other event
    assert net._selector.get_key(a).data == (None, writer)
    assert len(reprs) == (0 if register == "fixed" else 2)


def test_register_event_of_a_closed_socket_raises_as_kafka_pythons(net, pair):
    a, b = pair
    a.close()
    b.close()
    for fn in (kafka_fixes.register_event, kafka_fixes._stock["register_event"]):
        with pytest.raises(ValueError):
            fn(net, a, selectors.EVENT_READ, _task())


def _pending_wakeup_bytes(net: kafka.net.selector.NetworkSelector) -> int:
    try:
        return len(net._wakeup_r.recv(1024, socket.MSG_PEEK))
    except BlockingIOError:
        return 0


def test_wakeup_writes_one_byte_until_the_loop_drains_it(net):
    for _ in range(5):
        kafka_fixes.wakeup(net)
    assert _pending_wakeup_bytes(net) == 1  # kafka-python's writes one a call: 5
    # the byte waiting wakes the loop: select sees the wake-up socket ready at once
    events = net._selector.select(0)
    assert [key.fileobj for key, _ in events] == [net._wakeup_r]
    net._process_events(events)  # drains it, then clears the flag
    assert _pending_wakeup_bytes(net) == 0
    kafka_fixes.wakeup(net)  # the next wake-up writes again
    assert _pending_wakeup_bytes(net) == 1


def test_kafka_pythons_wakeup_writes_a_byte_a_call(net):
    for _ in range(5):
        kafka_fixes._stock["wakeup"](net)
    assert _pending_wakeup_bytes(net) == 5


def test_a_rebuilt_wakeup_pair_wakes_again(net):
    kafka_fixes.wakeup(net)
    net._rebuild_wakeup_socketpair()  # kafka-python's answer to a broken pair: a new, empty one
    kafka_fixes.wakeup(net)
    assert _pending_wakeup_bytes(net) == 1


def test_tasks_handed_to_a_running_loop_from_other_threads_all_run(net):
    # the loop blocks in select with no timeout (nothing scheduled): a wake-up lost leaves a
    # task queued forever; each of 2 x 500 hand-offs must wake it (the wait's bound is a hang's,
    # not a speed: the 1,000 run in milliseconds)
    loop = threading.Thread(target=net.run_forever, daemon=True)
    loop.start()
    ran, done = [], threading.Event()

    def hand_off():
        for _ in range(500):
            net.call_soon_threadsafe(lambda: ran.append(1) or (len(ran) == 1000 and done.set()))

    threads = [threading.Thread(target=hand_off) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert done.wait(120), f"{1000 - len(ran)} tasks never ran: a wake-up was lost"
    finally:  # stopped by kafka-python's own wake-up: one that the fix lost must not hang the suite
        net._stop = True
        kafka_fixes._stock["wakeup"](net)
        loop.join(30)


def test_the_wakeup_flag_clears_only_after_kafka_python_drained_the_byte(net, monkeypatch):
    # cleared before the drain, a wake-up in between would be skipped and its byte never
    # written, while the drain empties the pair: the loop could then block with work queued
    seen = []
    stock = kafka_fixes._stock["process_events"]

    def drain(self, events):
        seen.append(("before", self._wake_pending is not None))
        stock(self, events)
        seen.append(("after", self._wake_pending is not None))

    monkeypatch.setitem(kafka_fixes._stock, "process_events", drain)
    kafka_fixes.wakeup(net)
    kafka_fixes.process_events(net, net._selector.select(0))
    assert seen == [("before", True), ("after", True)] and net._wake_pending is None


def test_the_wakeup_flag_clears_even_when_kafka_pythons_drain_raises(net, monkeypatch):
    def drain_then_fail(self, events):
        self._wakeup_r.recv(1024)
        raise RuntimeError("a task's callback failed")

    monkeypatch.setitem(kafka_fixes._stock, "process_events", drain_then_fail)
    kafka_fixes.wakeup(net)
    with pytest.raises(RuntimeError):
        kafka_fixes.process_events(net, net._selector.select(0))
    kafka_fixes.wakeup(net)  # a flag left set here would skip every wake-up from now on
    assert _pending_wakeup_bytes(net) == 1


def test_a_wakeup_on_a_closed_pair_is_ignored_and_leaves_the_flag_clear(net):
    net._wakeup_w.close()
    kafka_fixes.wakeup(net)  # kafka-python ignores the OSError too
    assert net._wake_pending is None


def test_a_flag_left_set_across_an_uninstall_is_ignored_after_install(net):
    # a loop that drained with kafka-python's own _process_events (fixes uninstalled) leaves
    # the flag set with no byte waiting; after install the next wake-up must still write
    kafka_fixes.wakeup(net)
    kafka_fixes.uninstall()
    try:
        net._process_events(net._selector.select(0))  # kafka-python's: drains, flag untouched
    finally:
        kafka_fixes.install()
    assert _pending_wakeup_bytes(net) == 0 and net._wake_pending is not None
    kafka_fixes.wakeup(net)
    assert _pending_wakeup_bytes(net) == 1


def test_register_event_on_a_closed_selector_raises_as_kafka_pythons(net, pair):
    net._selector.close()
    for fn in (kafka_fixes.register_event, kafka_fixes._stock["register_event"]):
        with pytest.raises(RuntimeError):
            fn(net, pair[0], selectors.EVENT_READ, _task())
