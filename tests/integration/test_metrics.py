"""Prometheus really scrapes a service's metrics endpoint (queried through its HTTP API)."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request

from services import metrics
from services.infra import register_target, unregister_target


def query(prom_url: str, promql: str) -> list:
    url = f"{prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for(prom_url: str, promql: str, timeout: float = 45.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = query(prom_url, promql)
        if res:
            return res
        time.sleep(0.5)
    return []


def test_prometheus_scrapes_service_metrics_and_health(infra_cfg):
    server = metrics.serve("127.0.0.1", 0, health=lambda: {"status": "ok", "service": "scrape-test"})
    port = server.server_port
    metrics.MESSAGES_IN.labels("scrape-test", "files").inc(7)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
        assert json.load(r)["service"] == "scrape-test"
    register_target(infra_cfg.state_dir, "scrape-test", f"127.0.0.1:{port}")
    try:
        res = wait_for(infra_cfg.prometheus_url, 'apmae_messages_in_total{service="scrape-test",target="scrape-test"}')
        assert res, "Prometheus never returned the scraped counter"
        assert float(res[0]["value"][1]) == 7.0
        up = query(infra_cfg.prometheus_url, 'up{job="apmae",target="scrape-test"}')
        assert up and up[0]["value"][1] == "1"
    finally:
        unregister_target(infra_cfg.state_dir, "scrape-test")
        server.shutdown()
