"""Shared fixtures. Integration tests start real servers (Tansu broker, redis-server,
Prometheus) on free ports under a temporary state directory, once per test session."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from apmae.config import BusConfig
from services.infra import InfraConfig, InfraError, down, free_port, up


@pytest.fixture(scope="session")
def infra_cfg(tmp_path_factory) -> InfraConfig:
    # ephemeral (in-memory broker): durability is tested on its own (test_durable_broker.py),
    # and the broker-restart fault test is about a broker that loses its topics
    cfg = InfraConfig(state_dir=tmp_path_factory.mktemp("infra"), kafka_port=free_port(),
                      redis_port=free_port(), prometheus_port=free_port(), scrape_interval="1s", ephemeral=True)
    try:
        up(cfg)
    except InfraError as e:
        down(cfg)
        pytest.fail(f"embedded infrastructure did not start (run scripts/bootstrap.sh): {e}")
    yield cfg
    down(cfg)


@pytest.fixture
def bus_cfg(infra_cfg: InfraConfig, tmp_path: Path) -> BusConfig:
    """A BusConfig on the session's servers with a fresh topic prefix (test isolation)."""
    return BusConfig(bootstrap_servers=infra_cfg.bootstrap_servers, redis_url=infra_cfg.redis_url,
                     state_dir=tmp_path, topic_prefix=f"t{uuid.uuid4().hex[:8]}.", group_poll_interval_ms=8000)


@pytest.fixture
def redis_client(infra_cfg: InfraConfig):
    import redis

    return redis.Redis.from_url(infra_cfg.redis_url)


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in ("unit", "integration", "e2e"):
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random StarCoder2 + FIM tokenizer saved like a hub checkpoint (no download)."""
    from apmae.tiny import SAMPLE_JAVA, save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-sc2"), [SAMPLE_JAVA] * 3)


def java_files(n: int, tag: str = "") -> list:
    """n distinct, long-enough Java files (FileRecords) built from the sample class."""
    from apmae.corpus import content_id
    from apmae.tiny import SAMPLE_JAVA
    from apmae.topics import FileRecord

    out = []
    for i in range(n):
        text = SAMPLE_JAVA.replace("Counter", f"Counter{tag}{i}") * 3
        out.append(FileRecord(id=content_id(text), source="test", path=f"Counter{i}.java", content=text))
    return out
