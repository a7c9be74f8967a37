"""Prometheus metrics shared by every service, and the /metrics + /healthz endpoint.

Names follow Prometheus conventions (``apmae_<thing>_total``, ``_seconds``, ``_bytes``) with
low-cardinality labels: service, topic, model, task, reason. Never a sample id.
"""

from __future__ import annotations

import json
import logging
import threading
import time
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
DUPLICATES_SKIPPED = Counter("apmae_duplicates_skipped_total", "Re-delivered inputs already done", ["service"])
PROCESSING_SECONDS = Histogram(
    "apmae_processing_seconds", "Seconds per processed batch", ["service"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
PUBLISH_SECONDS = Counter("apmae_publish_seconds_total", "Seconds spent producing and flushing outputs", ["service"])
CONSUMER_LAG = Gauge("apmae_consumer_lag_messages", "End offset minus position", ["service", "topic"])
UP = Gauge("apmae_service_up", "1 while the service loop runs", ["service"])
OFFSETS_RESET = Counter(
    "apmae_offsets_reset_total", "Times a consumer found its offsets beyond the topic end "
    "(topic recreated, e.g. the in-memory broker restarted)", ["service", "topic"],
)

_last_lag: dict[str, float] = {}


def update_lag(service: str, consumer: Any, bus: Any, every_s: float = 5.0) -> None:
    """Refresh the lag gauge at most every ``every_s`` seconds (end_offsets is a round trip)."""
    now = time.monotonic()
    if now - _last_lag.get(service, 0.0) < every_s:
        return
    _last_lag[service] = now
    try:
        tps = list(consumer.assignment())
        if not tps:
            return
        from services.bus import true_end_offsets

        ends = true_end_offsets(bus, tps)
        prefix = bus.cfg.topic_prefix
        per_topic: dict[str, int] = {}
        for tp in tps:
            pos = consumer.position(tp)
            lag = ends[tp] - pos
            name = tp.topic.removeprefix(prefix)
            if lag < 0:  # the topic is shorter than our position: it was recreated
                OFFSETS_RESET.labels(service, name).inc()
                log.error("%s: position %d is past the end %d of %s: topic recreated (broker "
                          "restarted?); reading from its beginning", service, pos, ends[tp], tp)
                consumer.seek_to_beginning(tp)
                lag = ends[tp]
            per_topic[name] = per_topic.get(name, 0) + lag
        for name, lag in per_topic.items():
            CONSUMER_LAG.labels(service, name).set(lag)
    except Exception as e:  # metrics must never break the loop
        log.debug("lag update failed: %s", e)


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
