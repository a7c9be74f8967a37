"""The production alert rules (deploy/alerts.yml) loaded into a real Prometheus that scrapes a
real /metrics endpoint: dead letters and a dead target fire their alerts; a healthy target and a
service without dead letters do not. The rules' `for` holds are set to 0 s in this copy (their
real durations are exercised by `promtool test rules`, tests/unit/test_deploy.py)."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import yaml

from services import metrics
from services.infra import InfraConfig, Prometheus, free_port, register_target

ROOT = Path(__file__).resolve().parents[2]


class RulesPrometheus(Prometheus):
    """The embedded Prometheus, plus rule_files."""

    rules: Path

    def prepare(self) -> None:
        super().prepare()
        conf_path = self.home / "prometheus.yml"
        conf = json.loads(conf_path.read_text())
        conf["rule_files"] = [str(self.rules)]
        conf_path.write_text(json.dumps(conf))


def api(url: str, path: str) -> dict:
    with urllib.request.urlopen(f"{url}/api/v1/{path}", timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def evaluations(url: str) -> str:
    groups = api(url, "rules")["groups"]
    return next(g["lastEvaluation"] for g in groups if g["name"] == "apmae-alerts")


def test_alert_rules_fire_in_a_real_prometheus(tmp_path):
    rules = yaml.safe_load((ROOT / "deploy/alerts.yml").read_text())
    n_for = 0
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"], n_for = "0s", n_for + 1
    assert n_for >= 5
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))

    cfg = InfraConfig(state_dir=tmp_path, prometheus_port=free_port(), scrape_interval="1s")
    prom = RulesPrometheus("prometheus", cfg.prometheus_port, cfg)
    prom.rules = tmp_path / "alerts.yml"
    server = metrics.serve("127.0.0.1", 0)
    prom.start()
    try:
        url = cfg.prometheus_url
        loaded = {r["name"] for g in api(url, "rules")["groups"] for r in g["rules"]}
        assert {"APMAEServiceDown", "APMAEDeadLetters", "APMAEConsumerLagGrowing", "APMAECorrectnessDrift",
                "APMAEScorerCalibration"} <= loaded
        metrics.DEADLETTERS.labels("alert-test", "files").inc(0)  # a series at 0 first: rate() needs two samples
        metrics.DEADLETTERS.labels("alert-quiet", "files").inc(0)
        register_target(tmp_path, "alert-test", f"127.0.0.1:{server.server_port}")
        register_target(tmp_path, "dead-svc", f"127.0.0.1:{free_port()}")  # nothing listens there
        firing: dict[str, list[dict]] = {}
        seen_evals: set[str] = set()
        # bounded by the rule group's own evaluations (every 1 s of Prometheus time), not a clock
        while len(seen_evals) < 120:
            metrics.DEADLETTERS.labels("alert-test", "files").inc(5)
            seen_evals.add(evaluations(url))
            alerts = [a for a in api(url, "alerts")["alerts"] if a["state"] == "firing"]
            firing = {}
            for a in alerts:
                firing.setdefault(a["labels"]["alertname"], []).append(a["labels"])
            if "APMAEDeadLetters" in firing and "APMAEServiceDown" in firing:
                break
            time.sleep(0.2)
        assert "APMAEDeadLetters" in firing, f"never fired in {len(seen_evals)} evaluations: {firing}"
        dead = firing["APMAEDeadLetters"]
        assert [(a["service"], a["topic"]) for a in dead] == [("alert-test", "files")]  # the quiet one stays quiet
        assert dead[0]["severity"] == "ticket"
        down = firing.get("APMAEServiceDown", [])
        assert [a["target"] for a in down] == ["dead-svc"], down
        # the annotation templates render with the live value
        text = json.dumps(api(url, "alerts"))
        assert re.search(r"\d+\.\d\d dead letters per second", text), text
    finally:
        prom.stop()
        server.shutdown()
