"""docker-compose.yml and the Grafana dashboards are well-formed (no Docker engine here)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_every_component_and_kraft_kafka():
    svc = compose()["services"]
    assert {"kafka", "redis", "prometheus", "grafana", "ingest", "producer", "trainer", "encoder", "cluster-worker",
            "assign", "classifier"} <= set(svc)
    env = svc["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller" and "zookeeper" not in json.dumps(svc).lower()


def test_gpu_reservations_replicas_healthchecks_volumes():
    svc = compose()["services"]
    for name in ("producer", "trainer"):
        devices = svc[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    for name in ("encoder", "cluster-worker", "assign"):
        assert svc[name]["deploy"]["replicas"] >= 2
    for name in ("kafka", "redis", "prometheus", "grafana", "encoder", "classifier"):
        assert "test" in svc[name]["healthcheck"]
    assert "/data" in svc["encoder"]["volumes"][0]
    assert svc["encoder"]["environment"]["APMAE_BOOTSTRAP_SERVERS"] == "kafka:9092"
    # the services' CLI subcommands exist
    from click.testing import CliRunner

    from services.cli import main

    for name in ("ingest", "encoder", "assign", "classifier"):
        cmd = svc[name]["command"]
        res = CliRunner().invoke(main, [*cmd[: 2 if cmd[0] in ("classify", "cluster") else 1], "--help"])
        assert res.exit_code == 0, (name, res.output)


def test_grafana_provisioning_and_dashboards():
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    boards = list((ROOT / "deploy/grafana/dashboards").glob("*.json"))
    assert len(boards) == 3
    for b in boards:
        d = json.loads(b.read_text())
        assert d["panels"], b
        for p in d["panels"]:
            assert p["datasource"]["uid"] == uid and p["targets"][0]["expr"]
