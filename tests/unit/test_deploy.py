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
    # no secret comes from the environment or has a default: none is interpolated at all
    assert not re.findall(r"\$\{(\w*(?:PASSWORD|SECRET|TOKEN)\w*)([^}]*)\}", text)
    # what compose publishes binds the loopback only
    for name, s in svc.items():
        for port in s.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    script = (ROOT / "deploy/make-secrets.sh").read_text()
    assert "subjectAltName=DNS:kafka" in script and "umask 077" in script


def test_embedded_servers_bind_the_loopback_only(tmp_path):
    from services.infra import InfraConfig, servers

    for server in servers(InfraConfig(state_dir=tmp_path, redis_password="x")):
        cmd = " ".join(server.command())
        assert "127.0.0.1" in cmd and "0.0.0.0" not in cmd, cmd


def test_redis_password_is_never_on_the_command_line(tmp_path):
    from services.infra import InfraConfig, servers

    redis = next(s for s in servers(InfraConfig(state_dir=tmp_path, redis_password="pw-123"), ("redis",)))
    assert "pw-123" not in " ".join(redis.command()) and redis.stdin_config() == b"requirepass pw-123\n"


def boards() -> dict[str, dict]:
    return {b.stem: json.loads(b.read_text()) for b in sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))}


def exprs(board: dict) -> list[str]:
    return [t["expr"] for p in board["panels"] for t in p["targets"]]


def defined_metrics() -> dict[str, str]:
    """Every metric the code registers, name -> type (from the prometheus_client constructors)."""
    import re

    found = {}
    for path in [*(ROOT / "services").glob("*.py"), *(ROOT / "apmae").glob("*.py")]:
        for kind, name in re.findall(r"\b(Counter|Gauge|Histogram)\(\s*\"(apmae_\w+)\"", path.read_text()):
            found[name] = kind
    return found


def test_every_counter_panel_uses_rate_or_increase():
    import re

    counters = {n for n, k in defined_metrics().items() if k in ("Counter", "Histogram")}
    assert "apmae_deadletters_total" in counters and "apmae_producer_seconds_total" in counters
    raw = []
    for name, board in boards().items():
        for e in exprs(board):
            for m in re.finditer(r"apmae_\w+", e):
                metric = m.group(0)
                base = re.sub(r"_(bucket|sum|count)$", "", metric)
                if metric in counters or base in counters:
                    if not re.search(r"\b(rate|increase|irate)\($", e[: m.start()]):
                        raw.append(f"{name}: {metric} in {e}")
    assert not raw, "counters plotted raw:\n" + "\n".join(raw)


def test_dashboards_and_alerts_use_only_metrics_the_code_defines():
    import re

    names = set(defined_metrics())
    assert "apmae_cluster_noise_ratio" in names and "apmae_cluster_noise_rate" not in names
    assert {"apmae_build_info", "apmae_consumer_group_lag_messages", "apmae_ingest_bytes_total"} <= names
    texts = [e for b in boards().values() for e in exprs(b)] + [(ROOT / "deploy/alerts.yml").read_text()]
    texts += [v["definition"] for b in boards().values() for v in b["templating"]["list"]]
    unknown = set()
    for t in texts:
        for metric in re.findall(r"\bapmae_\w+", t):
            if metric not in names and re.sub(r"_(bucket|sum|count)$", "", metric) not in names:
                unknown.add(metric)
    assert not unknown, unknown


def test_template_variables_and_on_call_panels():
    b = boards()
    variables = {name: {v["name"] for v in d["templating"]["list"]} for name, d in b.items()}
    assert {"model", "task"} <= variables["correctness"] and {"model", "layer"} <= variables["clusters"]
    for name, d in b.items():  # every variable filters at least one panel, and "All" means every value
        for v in d["templating"]["list"]:
            assert v["includeAll"] and v["allValue"] == ".*" and v["definition"].startswith("label_values(")
            assert any(f"=~\"${v['name']}\"" in e for e in exprs(d)), (name, v["name"])
    onc = "\n".join(exprs(b["pipeline"]))
    for needle in ('histogram_quantile(0.5, sum by (service, le) (rate(apmae_processing_seconds_bucket',
                   'histogram_quantile(0.95, sum by (service, le) (rate(apmae_processing_seconds_bucket',
                   "rate(apmae_errors_total", "rate(apmae_deadletters_total", 'up{job="apmae"}',
                   "sum by (group, topic) (apmae_consumer_group_lag_messages)", "rate(apmae_producer_patterns_total",
                   "rate(apmae_bytes_out_total[$__rate_interval])) / 1e6", "apmae_build_info"):
        assert needle in onc, needle
    # no per-head panel draws every head of every layer: head series are filtered or top-k'd
    for e in exprs(b["clusters"]):
        if "apmae_cluster_noise_ratio" in e or "apmae_cluster_clusters" in e:
            assert "topk(" in e or "by (" in e, e


def promtool(*args: str, cwd: Path = ROOT / "deploy") -> str:
    import shutil
    import subprocess

    exe = shutil.which("promtool") or "/usr/bin/promtool"
    assert Path(exe).exists(), "promtool missing: scripts/bootstrap.sh installs Debian's prometheus"
    res = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout + res.stderr


def test_promtool_checks_the_rules_the_config_and_each_alerts_for_duration():
    assert "SUCCESS: 8 rules found" in promtool("check", "rules", "alerts.yml")
    out = promtool("check", "config", "prometheus.yml")
    assert "1 rule files found" in out and "SUCCESS" in out
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml")
    alerts = {r["alert"] for g in yaml.safe_load((ROOT / "deploy/alerts.yml").read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    tested = {t["alertname"] for case in yaml.safe_load((ROOT / "deploy/alerts.test.yml").read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert alerts == tested and {"APMAEServiceDown", "APMAEConsumerLagGrowing", "APMAEDeadLetters",
                                 "APMAECorrectnessDrift", "APMAEScorerCalibration"} <= alerts


def test_promtool_test_rules_catches_a_broken_alert(tmp_path):
    """The alert unit tests can fail: an alert that never fires makes them fail."""
    import shutil
    import subprocess

    rules = (ROOT / "deploy/alerts.yml").read_text().replace("expr: up{job=\"apmae\"} == 0", "expr: up{job=\"apmae\"} == 2")
    (tmp_path / "alerts.yml").write_text(rules)
    shutil.copy(ROOT / "deploy/alerts.test.yml", tmp_path)
    res = subprocess.run(["promtool", "test", "rules", "alerts.test.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode != 0 and "APMAEServiceDown" in res.stdout + res.stderr


def test_compose_prometheus_mounts_the_rules_next_to_its_config():
    prom = compose()["services"]["prometheus"]
    mounts = " ".join(prom["volumes"])
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml" in mounts
    assert "./deploy/alerts.yml:/etc/prometheus/alerts.yml" in mounts
    conf = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    assert conf["rule_files"] == ["alerts.yml"]


def test_compose_file_is_valid_against_the_compose_specification_schema():
    import jsonschema

    # vendored (Apache-2.0, the commit in VERSION): a clean clone elsewhere has no ../shared
    schema = json.loads((ROOT / "tests/data/compose-spec/compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:20])
    # the validator does reject what the spec forbids (the check can fail)
    broken = compose()
    broken["services"]["redis"]["restart"] = {"policy": "always"}
    broken["services"]["kafka"]["gpu_count"] = 1  # no such key
    assert len(list(validator.iter_errors(broken))) >= 2


def test_kafka_writes_its_log_to_the_volume():
    kafka = compose()["services"]["kafka"]
    log_dirs = kafka["environment"]["KAFKA_LOG_DIRS"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in kafka["volumes"]}
    assert mounts[log_dirs] == "kafka" and "kafka" in compose()["volumes"]  # a named volume, not /tmp


def test_each_producer_owns_one_gpu():
    svc = compose()["services"]
    producers = {n: s for n, s in svc.items() if s.get("command", [None])[0] == "produce"}
    assert {"producer", "producer-1"} <= set(producers)
    gpus = []
    for name, s in producers.items():
        assert s["deploy"]["replicas"] == 1, name  # scaling a producer would share its GPU
        (dev,) = s["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in dev and len(dev["device_ids"]) == 1, name
        gpus += dev["device_ids"]
    assert len(gpus) == len(set(gpus))  # no two producers on one GPU


def test_secrets_are_files_everywhere():
    import re

    text = (ROOT / "docker-compose.yml").read_text()
    svc = compose()["services"]
    for name, spec in compose()["secrets"].items():
        assert set(spec) == {"file"} and spec["file"].startswith("./deploy/secrets/"), name
    env = svc["encoder"]["environment"]
    assert env["APMAE_REDIS_URL_FILE"] == "/run/secrets/redis_url" and "APMAE_REDIS_URL" not in env
    assert "redis_url" in svc["encoder"]["secrets"]
    # no password on a command line or in an environment value, anywhere
    for name, s in svc.items():
        flat = json.dumps([s.get("command"), s.get("entrypoint"), s.get("environment")])
        assert not re.search(r"requirepass\s+[^%]|password=\"?\$\{|PASSWORD\"?: ?\"?\$\{", flat), name
        for k, v in (s.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN", k):
                assert k.endswith("_FILE") and str(v).startswith("/run/secrets/"), (name, k)
    assert svc["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert "/run/secrets/redis_password" in " ".join(svc["redis"]["command"])
    assert "kafka_server_jaas.conf" in svc["kafka"]["environment"]["KAFKA_OPTS"]
    assert "./deploy/secrets/kafka:/etc/kafka/secrets:ro" in svc["kafka"]["volumes"]  # not the CA key
    assert not re.search(r"\$\{\w*(PASSWORD|SECRET|TOKEN)", text)


def test_make_secrets_writes_every_secret_file_private(tmp_path):
    import shutil
    import stat
    import subprocess

    (tmp_path / "deploy").mkdir()
    shutil.copy(ROOT / "deploy/make-secrets.sh", tmp_path / "deploy")
    env = {"PATH": "/usr/bin:/bin", "REDIS_PASSWORD": "r3d1s-pw"}
    res = subprocess.run(["bash", str(tmp_path / "deploy/make-secrets.sh")], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "deploy/secrets"
    for spec in compose()["secrets"].values():
        path = tmp_path / spec["file"]
        assert path.is_file() and path.stat().st_size > 0, path
    assert (out / "redis_url").read_text() == "redis://:r3d1s-pw@redis:6379/0"
    assert len((out / "kafka_password").read_text()) == 64  # random when not given
    for p in out.rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))
    jaas = (out / "kafka/kafka_server_jaas.conf").read_text()
    assert (out / "kafka_password").read_text() in jaas and not (out / "kafka/ca.key").exists()
    before = (out / "kafka_password").read_text()
    subprocess.run(["bash", str(tmp_path / "deploy/make-secrets.sh")], env=env, check=True, capture_output=True)
    assert (out / "kafka_password").read_text() == before  # re-running never rotates


def test_images_pinned_by_digest_and_redis_not_floating():
    import re

    images = [s["image"] for s in compose()["services"].values() if "/" in s["image"] or ":" in s["image"]]
    external = [i for i in images if not i.startswith("apmae:")]
    assert len(external) == 4
    for image in external:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), image
        assert not re.search(r":(latest|\d+)@", image), image  # an exact version tag, not "redis:7"
    assert compose()["services"]["redis"]["image"].startswith("redis:7.4.2@")
    for dockerfile in ("deploy/Dockerfile", "deploy/Dockerfile.cuda"):
        (base,) = re.findall(r"^FROM (\S+)", (ROOT / dockerfile).read_text(), re.M)
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", base), base


def test_dockerignore_keeps_the_venv_and_secrets_out_of_the_build_context():
    import fnmatch

    lines = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines() if x.strip() and x[0] != "#"]

    def ignored(path: str) -> bool:  # Docker's rule: the last matching pattern wins
        verdict = False
        for pat in lines:
            neg = pat.startswith("!")
            p = pat[1:] if neg else pat
            p = p.rstrip("/")
            if fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p + "/*") or fnmatch.fnmatch(path, p.replace("**/", "")):
                verdict = not neg
        return verdict

    for path in (".venv/lib/python3.11/site-packages/torch/lib/libtorch.so", "deploy/secrets/redis_password",
                 ".git/HEAD", ".apmae/infra/redis.log", "benchmarks/results/bus.json", "tests/conftest.py"):
        assert ignored(path), path
    for path in ("pyproject.toml", "README.md", "apmae/topics.py", "services/cli.py"):
        assert not ignored(path), path
    for dockerfile in ("deploy/Dockerfile", "deploy/Dockerfile.cuda"):
        import re

        for src in re.findall(r"^COPY (.+) \S+$", (ROOT / dockerfile).read_text(), re.M):
            for item in src.split():
                assert not ignored(item), (dockerfile, item)


def test_cuda_image_installs_a_python_its_ubuntu_base_ships():
    import re

    text = (ROOT / "deploy/Dockerfile.cuda").read_text()
    body = text.split("\nFROM ", 1)[1]
    assert body.startswith("nvidia/cuda:") and "ubuntu24.04" in body.split()[0]
    assert "python3.11" not in body  # noble has no python3.11 package
    install = re.search(r"apt-get install[^&]+", body).group(0)
    assert "python3 " in install and "python3-venv" in install


def test_topic_configs_apply_the_declared_compaction_and_retention():
    from apmae.topics import ALL_TOPICS, CHECKPOINTS, FILES, FIT_JOBS, topic_configs

    known = {"cleanup.policy", "retention.ms", "retention.bytes", "min.compaction.lag.ms", "max.message.bytes"}
    for t in ALL_TOPICS:
        cfg = topic_configs(t)
        assert set(cfg) <= known and all(isinstance(v, str) for v in cfg.values()), t.name
        assert cfg["cleanup.policy"] == ("compact" if t.compacted else "delete"), t.name
    assert [t.name for t in ALL_TOPICS if t.compacted] == [CHECKPOINTS.name]
    assert topic_configs(FILES)["retention.ms"] == "-1"  # replayable: kept
    assert int(topic_configs(FIT_JOBS)["retention.ms"]) == 7 * 24 * 3600 * 1000
    assert topic_configs(FILES, 4 << 20)["max.message.bytes"] == str(4 << 20)


def test_dashboard_variables_expand_like_grafana():
    from services.dashboards import expand, variable_query

    e = 'sum by (model) (rate(apmae_producer_patterns_total{model=~"$model"}[$__rate_interval]))'
    assert expand(e) == 'sum by (model) (rate(apmae_producer_patterns_total{model=~".*"}[1m]))'
    assert expand(e, {"model": "sc2"}, "2m") == 'sum by (model) (rate(apmae_producer_patterns_total{model=~"sc2"}[2m]))'
    assert variable_query('label_values(apmae_cluster_clusters{model=~"$model"}, layer)') == (
        'apmae_cluster_clusters{model=~"$model"}', "layer")
