"""Secrets: never printed, never logged, never taken from argv; the embedded Redis always has one.

Runs the CLI as a user would (its own embedded servers under a fresh state directory), with
the Redis password and the SASL password set through the environment and files, and greps
everything every command wrote to stdout and stderr, and every file under the state
directory except the 0600 secret files themselves.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from services.infra import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


class Cli:
    def __init__(self, state: Path, **env: str):
        self.state = state
        self.ports = {"APMAE_KAFKA_PORT": str(free_port()), "APMAE_REDIS_PORT": str(free_port()),
                      "APMAE_PROMETHEUS_PORT": str(free_port()), "APMAE_S3_PORT": str(free_port())}
        self.env = {**os.environ, "APMAE_STATE_DIR": str(state), **self.ports, **env}
        self.output: list[str] = []

    def __call__(self, *args: str, ok: bool = True, **env: str) -> str:
        p = subprocess.run([sys.executable, "-m", "services.cli", *args], env=self.env | env, cwd=ROOT,
                           capture_output=True, text=True)
        self.output += [p.stdout, p.stderr]
        assert (p.returncode == 0) == ok, (args, p.returncode, p.stderr[-3000:])
        return p.stdout + p.stderr

    def leaks(self, secret: str) -> list[str]:
        found = [f"output of command {i // 2}" for i, out in enumerate(self.output) if secret in out]
        for p in self.state.rglob("*"):
            if p.is_file() and p.name not in ("redis.password", "redis.url") and secret.encode() in p.read_bytes():
                found.append(str(p))
        return found


def test_a_generated_redis_password_is_required_private_and_never_printed(tmp_path):
    cli = Cli(tmp_path / "state")
    try:
        cli("infra", "up", "--only", "redis")
        pw_file, url_file = tmp_path / "state/infra/redis.password", tmp_path / "state/infra/redis.url"
        for f in (pw_file, url_file):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        password = pw_file.read_text().strip()
        assert len(password) >= 32
        port = int(cli.ports["APMAE_REDIS_PORT"])
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port).ping()  # no password, no access
        assert redis.Redis.from_url(url_file.read_text()).ping()
        # only Redis is up: status says which servers are down and exits 1 (scripts read it)
        assert "DOWN" in cli("infra", "status", ok=False)
        cli("infra", "status", "--json", ok=False)
        cli("infra", "up", "--only", "redis")  # idempotent: the same password, still not shown
        assert pw_file.read_text().strip() == password
    finally:
        cli("infra", "down", "--only", "redis")
    assert not cli.leaks(password), cli.leaks(password)


def test_no_command_prints_or_logs_a_secret_and_none_takes_one_from_argv(tmp_path):
    redis_pw, sasl_pw = "redis-pw-0f3a9c1d7e", "sasl-pw-8b2e4d6f0a"
    pw_file = tmp_path / "redis_password"
    pw_file.write_text(redis_pw)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "A.java").write_text("class A { int f() { return 1; } }\n" * 20)
    cli = Cli(tmp_path / "state", APMAE_REDIS_PASSWORD_FILE=str(pw_file), APMAE_SASL_PASSWORD=sasl_pw)
    url = f"redis://:{redis_pw}@127.0.0.1:{cli.ports['APMAE_REDIS_PORT']}/0"
    bootstrap = f"127.0.0.1:{cli.ports['APMAE_KAFKA_PORT']}"
    svc = {"APMAE_REDIS_URL": url, "APMAE_BOOTSTRAP_SERVERS": bootstrap}
    try:
        cli("infra", "up", "--only", "broker,redis")
        cli("infra", "status", ok=False)  # Prometheus is not up
        cli("infra", "status", "--json", ok=False)
        cli("-v", "topics", **svc)
        cli("-v", "ingest", "--corpus", str(corpus), **svc)
        cli("-v", "export", str(tmp_path / "state" / "export"), "--topic", "files", **svc)
        for args in (["infra", "up"], ["ingest"], ["produce"], ["encode"], ["classify", "serve"], ["demo"]):
            cli(*args, "--help")
        # refused, with the value never echoed back
        for args in (["infra", "status", "--redis-password", redis_pw], ["topics", "--sasl-password", sasl_pw],
                     ["topics", "--redis-url", url], ["ingest", "--corpus", str(corpus), "--redis-url", url]):
            out = cli(*args, ok=False)
            assert "not accepted on the command line" in out, out
    finally:
        cli("infra", "down", "--only", "broker,redis")
    assert len("".join(cli.output)) > 1000  # the commands did talk
    for secret in (redis_pw, sasl_pw):
        assert not cli.leaks(secret), cli.leaks(secret)
