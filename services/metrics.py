"""Prometheus metrics shared by every service, and the /metrics + /healthz endpoint.

Names follow Prometheus conventions (``apmae_<thing>_total``, ``_seconds``, ``_bytes``) with
low-cardinality labels: service, topic, model, task, reason. Never a sample id.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger("apmae.metrics")

MESSAGES_IN = Counter("apmae_messages_in_total", "Messages consumed", ["service", "topic"])
MESSAGES_OUT = Counter("apmae_messages_out_total", "Messages produced", ["service", "topic"])
BYTES_OUT = Counter("apmae_bytes_out_total", "Message bytes produced", ["service", "topic"])
ERRORS = Counter("apmae_errors_total", "Failures that caused a retry", ["service", "kind"])
DEADLETTERS = Counter("apmae_deadletters_total", "Messages sent to the dead-letter topic", ["service", "topic"])
PREPARE_FAILURES = Counter("apmae_prepare_failures_total", "Batches fetched ahead whose prepare step raised (their "
                           "handler did that work in line)", ["service"])
DUPLICATES_SKIPPED = Counter("apmae_duplicates_skipped_total", "Re-delivered inputs already done", ["service"])
PROCESSING_SECONDS = Histogram(
    "apmae_processing_seconds", "Seconds per processed batch", ["service"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
PUBLISH_SECONDS = Counter("apmae_publish_seconds_total", "Seconds spent producing and flushing outputs", ["service"])
CONSUMER_LAG = Gauge("apmae_consumer_lag_messages", "End offset minus position", ["service", "topic"])
UP = Gauge("apmae_service_up", "1 while the service loop runs", ["service"])
GENERATION_MISMATCH = Gauge("apmae_broker_generation_mismatch",
                            "1 when the embedded broker's log is not the one Redis' state (done marks, seen sets) "
                            "describes", ["service"])
OFFSETS_RESET = Counter(
    "apmae_offsets_reset_total", "Times a consumer found its offsets beyond the topic end "
    "(topic recreated, e.g. the in-memory broker restarted)", ["service", "topic"],
)

CONSUMER_STALLED = Counter(
    "apmae_consumer_stalled_total",
    "Times a consumer fetched nothing with its input unread for too long (the process then starts again)",
    ["service"])

GROUP_LAG = Gauge("apmae_consumer_group_lag_messages", "End offset minus position, per consumer group",
                  ["group", "topic"])
BUILD_INFO = Gauge("apmae_build_info", "Always 1; the labels say which build runs", ["version", "python", "commit"])


def _build_info() -> None:
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("apmae")
    except PackageNotFoundError:
        ver = "unknown"
    BUILD_INFO.labels(ver, platform.python_version(), os.environ.get("APMAE_GIT_COMMIT", "unknown")).set(1)


_build_info()


class HeadSeries:
    """Per-head series (label sets ending in ``model, layer, head``), bounded.

    At most ``limit`` heads export series (0: none, opt-in); when a new head would exceed the
    limit, the head updated longest ago loses its series. ``forget`` removes the series of
    heads whose partition this process no longer owns (after a rebalance), so two owners never
    export conflicting values for one head.
    """

    def __init__(self, *metrics: Any, limit: int = 100):
        self.metrics = metrics
        self.limit = limit
        self._heads: dict[tuple[str, str, str], None] = {}  # insertion order = least recently used first
        self._lock = threading.Lock()

    def admit(self, model: str, layer: Any, head: Any) -> bool:
        """True when this head may export series now (it becomes the most recently used)."""
        key = (str(model), str(layer), str(head))
        with self._lock:
            if self.limit <= 0:
                return False
            if key in self._heads:
                self._heads.pop(key)
            elif len(self._heads) >= self.limit:
                self._remove(next(iter(self._heads)))
            self._heads[key] = None
            return True

    def _remove(self, key: tuple[str, str, str]) -> None:
        self._heads.pop(key, None)
        for m in self.metrics:
            try:
                m.remove(*key)
            except KeyError:
                pass

    def forget(self, keep: Callable[[tuple[str, str, str]], bool]) -> int:
        """Drop every head for which ``keep(key)`` is false; returns how many."""
        with self._lock:
            gone = [k for k in self._heads if not keep(k)]
            for k in gone:
                self._remove(k)
            return len(gone)

    def heads(self) -> list[tuple[str, str, str]]:
        with self._lock:
            return list(self._heads)


NATIVE_CRC32C = Gauge("apmae_kafka_native_crc32c", "1 when kafka-python checksums record batches in C "
                      "(the crc32c extension); 0 means pure Python at ~6.5 MB/s")


def check_native_crc32c(service: str, native: bool) -> None:
    """Export whether the Kafka client checksums natively; warn once, clearly, where it does not."""
    NATIVE_CRC32C.set(1 if native else 0)
    if not native:
        log.warning("%s: kafka-python is checksumming record batches in pure Python (~6.5 MB/s for the "
                    "whole service): install the crc32c package (pip install 'crc32c==2.*')", service)


class _Handler(BaseHTTPRequestHandler):
    health: Callable[[], dict[str, Any]] = staticmethod(lambda: {"status": "ok"})

    def do_GET(self) -> None:
        if self.path.startswith("/metrics"):
            body, ctype, code = generate_latest(REGISTRY), CONTENT_TYPE_LATEST, 200
        elif self.path.startswith("/healthz"):
            state = self.health()
            code = 200 if state.get("status") == "ok" else 503
            body, ctype = json.dumps(state).encode(), "application/json"
        else:
            body, ctype, code = b"not found\n", "text/plain", 404
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:  # keep scrapes out of the service log
        pass


def serve(host: str = "127.0.0.1", port: int = 0,
          health: Callable[[], dict[str, Any]] | None = None) -> ThreadingHTTPServer:
    """Start the endpoint in a daemon thread; returns the server (``server.server_port``)."""
    handler = type("Handler", (_Handler,), {"health": staticmethod(health or (lambda: {"status": "ok"}))})
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server
