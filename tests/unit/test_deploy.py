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


def test_production_broker_requires_sasl_over_tls_and_no_secret_has_a_default():
    import re

    text = (ROOT / "docker-compose.yml").read_text()
    svc = compose()["services"]
    kafka = svc["kafka"]["environment"]
    assert kafka["KAFKA_LISTENERS"].startswith("SASL_SSL://") and "PLAINTEXT://:9092" not in kafka["KAFKA_LISTENERS"]
    assert kafka["KAFKA_SASL_ENABLED_MECHANISMS"] == "PLAIN" and kafka["KAFKA_SSL_KEYSTORE_TYPE"] == "PEM"
    for name in ("ingest", "encoder", "classifier", "producer", "trainer"):
        env = svc[name]["environment"]
        assert env["APMAE_SECURITY_PROTOCOL"] == "SASL_SSL" and env["APMAE_SASL_PASSWORD_FILE"].startswith("/run/secrets/")
        assert "APMAE_SASL_PASSWORD" not in env  # only from the secret file
    # every secret must be supplied: ${X:?...}, never ${X:-default} or a literal
    for var in re.findall(r"\$\{(\w*(?:PASSWORD|SECRET|TOKEN)\w*)([^}]*)\}", text):
        assert var[1].startswith(":?"), var
    # what compose publishes binds the loopback only
    for name, s in svc.items():
        for port in s.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    script = (ROOT / "deploy/make-secrets.sh").read_text()
    assert "subjectAltName=DNS:kafka" in script and "KAFKA_PASSWORD:?" in script


def test_embedded_servers_bind_the_loopback_only(tmp_path):
    from services.infra import InfraConfig, servers

    for server in servers(InfraConfig(state_dir=tmp_path, redis_password="x")):
        cmd = " ".join(server.command())
        assert "127.0.0.1" in cmd and "0.0.0.0" not in cmd, cmd


def test_redis_password_is_never_on_the_command_line(tmp_path):
    from services.infra import InfraConfig, servers

    redis = next(s for s in servers(InfraConfig(state_dir=tmp_path, redis_password="pw-123"), ("redis",)))
    assert "pw-123" not in " ".join(redis.command()) and redis.stdin_config() == b"requirepass pw-123\n"
