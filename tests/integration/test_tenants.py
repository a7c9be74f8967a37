"""Tenants (topic prefixes) sharing one Redis and one state directory stay apart: the AP-MAE
registry, the trainer's run directory and the demo's reset all honour the prefix."""

from __future__ import annotations

import dataclasses

import pytest

from apmae.config import from_flat
from services.demo import Demo, DemoConfig
from services.encoder import Encoder, EncoderConfig
from services.registry import apmae_key
from services.trainer import TrainerConfig

pytestmark = pytest.mark.integration


def test_a_tenant_never_sees_another_tenants_checkpoint_or_run_dir(bus_cfg, redis_client):
    a, b = bus_cfg, dataclasses.replace(bus_cfg, topic_prefix=bus_cfg.topic_prefix + "b.")
    redis_client.hset(apmae_key(a.topic_prefix, "run"), mapping={"path": "x", "step": 1, "sha256": "0" * 64})
    assert Encoder(EncoderConfig(**vars(a), checkpoint="run")).current() is not None
    assert Encoder(EncoderConfig(**vars(b), checkpoint="run")).current() is None  # was tenant a's
    assert TrainerConfig(**vars(a), name="run").run_dir != TrainerConfig(**vars(b), name="run").run_dir


def demo(infra_cfg, tmp_path, prefix: str) -> Demo:
    return Demo(from_flat(DemoConfig, state_dir=tmp_path, kafka_port=infra_cfg.kafka_port,
                          redis_port=infra_cfg.redis_port, prometheus_port=infra_cfg.prometheus_port,
                          redis_password=infra_cfg.redis_secret(), topic_prefix=prefix))


def test_the_demo_reset_deletes_its_own_tenants_state_only(infra_cfg, redis_client, tmp_path):
    mine = ["apmae:done:rdemo.producer:rdemo.files:f1", "apmae:mine:rdemo.m:identifier:correct",
            "apmae:ingest:seen:rdemo.", apmae_key("rdemo.", "demo"), "apmae:registry:cluster:rdemo.v1"]
    others = ["apmae:done:other.producer:other.files:f1", "apmae:done:xrdemo.producer:xrdemo.files:f1",
              apmae_key("other.", "demo"), apmae_key("", "demo"), "apmae:ingest:seen:"]
    for k in mine + others:
        redis_client.set(k, b"1")
    d = demo(infra_cfg, tmp_path, "rdemo.")
    run_dir = d.common(TrainerConfig, name="demo").run_dir
    run_dir.mkdir(parents=True)
    other_run = dataclasses.replace(d.common(TrainerConfig, name="demo"), topic_prefix="other.").run_dir
    other_run.mkdir(parents=True)
    d.reset()
    assert [k for k in mine if redis_client.exists(k)] == []
    assert [k for k in others if not redis_client.exists(k)] == []
    assert not run_dir.exists() and other_run.exists()
    with pytest.raises(ValueError, match="needs a topic prefix"):  # it would match every tenant's keys
        demo(infra_cfg, tmp_path, "").reset()
    assert all(redis_client.exists(k) for k in others)
