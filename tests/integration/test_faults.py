"""Fault injection on the real services, as processes, against the real broker and Redis.

Each test starts a service with the CLI (``python -m services.cli ...``), waits until it
is part-way through its input, injects one fault (SIGKILL mid-batch, a Redis restart, a
second consumer joining the group), lets the service (or its restart) finish, and then
accounts for every input by id: exactly one output or one dead letter, none lost. Raw
duplicates in the output topic (at-least-once delivery: a kill between flush and commit)
are counted and bounded; distinct ids are what downstream consumers see, because every
output id is deterministic and every consumer drops repeats by id.

``pytest -s`` prints one ``FAULT`` line per test: the README's table.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest

from apmae.codec import encode_pattern
from apmae.topics import (
    ASSIGNMENTS,
    DEADLETTER,
    EMBEDDINGS,
    FILES,
    PATTERNS_MINE,
    PATTERNS_TRAIN,
    SAMPLES,
    SCORES,
    PatternRecord,
)
from services.bus import Bus, Output, read_range, topic_end_offsets
from services.infra import servers
from tests.conftest import java_files
from tests.integration.test_classifier_service import assignments, sample
from tests.integration.test_trainer import SIZE, pattern

pytestmark = [pytest.mark.integration, pytest.mark.fault]
ROOT = Path(__file__).resolve().parents[2]


def env_for(bus_cfg, **extra) -> dict[str, str]:
    env = os.environ | {f"APMAE_{k.upper()}": str(v) for k, v in vars(bus_cfg).items()}
    return env | {k: str(v) for k, v in extra.items()}


def start(args: list[str], bus_cfg, module: str = "services.cli", **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], env=env_for(bus_cfg, **extra), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def ids(bus, topic) -> list[str]:
    return [m.record.id for m in read_range(bus, topic)]


def wait_then(proc: subprocess.Popen, done, fault, timeout: float = 300) -> None:
    """Poll ``done()`` until it is true, then run ``fault()``; the service must still be running."""
    t0 = time.monotonic()
    while not done():
        assert proc.poll() is None, f"the service finished before the fault was injected: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() - t0 < timeout, "the service made no progress"
        time.sleep(0.1)
    fault()


def sigkill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def count_so_far(bus, topic):
    """A probe: how many messages ``topic`` holds now."""
    return lambda: sum(topic_end_offsets(bus, topic).values())


def account(name: str, inputs: set[str], outputs: list[str], dead: list[str], *, fault: str, **extra) -> dict:
    """Every input is one distinct output or one dead letter; print the README row."""
    got, dl = set(outputs), set(dead)
    row = {"service": name, "fault": fault, "in": len(inputs), "out": len(got & inputs), "dead_lettered": len(dl),
           "raw_duplicates": len(outputs) - len(got), "lost": len(inputs - got - dl), **extra}
    print("FAULT", json.dumps(row))
    assert row["lost"] == 0, inputs - got - dl
    assert got <= inputs  # nothing invented
    return row


# -- SIGKILL mid-batch, one service at a time ----------------------------------------------
def test_ingest_killed_mid_run_then_restarted(bus_cfg, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    files = java_files(3000, "k")
    for f in files:
        (corpus / f.path).write_text(f.content)
    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    proc = start(["ingest", "--corpus", str(corpus)], bus_cfg)
    wait_then(proc, lambda: count_so_far(bus, FILES)() >= 300, lambda: sigkill(proc))
    finish(start(["ingest", "--corpus", str(corpus)], bus_cfg))
    row = account("ingest", {f.id for f in files}, ids(bus, FILES), ids(bus, DEADLETTER), fault="SIGKILL")
    assert row["raw_duplicates"] <= 512  # at most the one unacknowledged batch is published again


def test_producer_killed_mid_batch_then_restarted(bus_cfg, tiny_model_dir):
    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    files = java_files(24, "p")
    for f in files:
        bus.send(Output(FILES, f))
    bus.flush()
    args = ["produce", "--model", str(tiny_model_dir), "--mine-per-task", "100000", "--balance-slack", "100000",
            "--idle-timeout", "30"]  # a restart first waits out the dead member's session
    proc = start(args, bus_cfg)
    wait_then(proc, lambda: count_so_far(bus, SAMPLES)() >= 40, lambda: sigkill(proc))
    finish(start(args, bus_cfg))
    samples = [m.record for m in read_range(bus, SAMPLES)]
    distinct = {s.id for s in samples}
    # a file is the producer's unit of work: every input file produced its samples, and the
    # duplicates counted are repeated sample ids (a batch re-run after the kill)
    account("producer", {f.id for f in files}, sorted({s.file_id for s in samples}), ids(bus, DEADLETTER),
            fault="SIGKILL", samples=len(distinct), raw_duplicate_samples=len(samples) - len(distinct))
    # every head of every distinct sample was mined, the same number per sample
    mined = Counter(m.record.sample_id for m in read_range(bus, PATTERNS_MINE))
    assert set(mined) == distinct and len(set(mined.values())) == 1


def patterns(bus, n: int, tag: str = "", topics=(PATTERNS_MINE, PATTERNS_TRAIN)) -> set[str]:
    """n random causal 64 x 64 patterns on ``topics``; returns their sample ids (one each)."""
    out = set()
    for i in range(n):
        a = pattern(zlib.crc32(f"{tag}{i}".encode()))  # deterministic per (tag, i)
        rec = PatternRecord(id=f"{tag}p{i}", sample_id=f"{tag}s{i}", model="m", task="identifier", layer=i % 3,
                            head=i % 2, correct=bool(i % 2), size=SIZE, payload=encode_pattern(a))
        for t in topics:
            bus.send(Output(t, rec, key=f"m/{i % 3}/{i % 2}"))
        out.add(rec.sample_id)
    bus.flush()
    return out


def test_encoder_killed_mid_batch_then_restarted(bus_cfg, redis_client):
    import torch

    from apmae.mae import APMAE, save, variant
    from services.registry import sha256_file

    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    inputs = patterns(bus, 1500)
    torch.manual_seed(0)
    d = save(APMAE(variant("small", pattern_size=64, patch_size=16)), bus_cfg.artifacts_dir / "ck1")
    redis_client.hset("apmae:registry:apmae:kill", mapping={"path": "ck1", "step": 1,
                                                          "sha256": sha256_file(d / "model.safetensors")})
    args = ["encode", "--checkpoint", "kill", "--batch-size", "16", "--idle-timeout", "30"]
    proc = start(args, bus_cfg)
    wait_then(proc, lambda: count_so_far(bus, EMBEDDINGS)() >= 200, lambda: sigkill(proc))
    finish(start(args, bus_cfg))
    embs = [m.record for m in read_range(bus, EMBEDDINGS)]
    account("encoder", inputs, [e.sample_id for e in embs], ids(bus, DEADLETTER), fault="SIGKILL")
    assert len({e.id for e in embs}) == len(inputs)  # one embedding id per pattern


def test_trainer_killed_mid_run_resumes_from_its_checkpointed_offsets(bus_cfg):
    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    patterns(bus, 400)
    args = ["--variant", "tiny", "--pattern-size", "64", "--patch-size", "16", "--batch-size", "8", "--steps", "50",
            "--checkpoint-every", "5", "--name", "kill", "--idle-timeout-s", "10"]
    run_dir = bus_cfg.artifacts_dir / "trainer" / "kill"
    proc = start(args, bus_cfg, module="services.trainer")

    def step_of_latest() -> int:
        p = run_dir / "LATEST"
        if not p.exists():
            return 0
        cfg = run_dir / p.read_text().strip() / "config.json"
        return json.loads(cfg.read_text())["step"] if cfg.exists() else 0

    wait_then(proc, lambda: step_of_latest() >= 10, lambda: sigkill(proc))
    resumed_at = step_of_latest()
    out = finish(start(args, bus_cfg, module="services.trainer"))
    result = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert result["resumed_from"].endswith(f"{resumed_at:08d}") and result["step"] == 50
    meta = json.loads((run_dir / (run_dir / "LATEST").read_text().strip() / "config.json").read_text())
    # offsets: exactly the checkpointed patterns plus the resumed run's, none twice, none skipped
    assert sum(meta["offsets"].values()) == 50 * 8
    assert result["patterns"] == (50 - resumed_at) * 8
    print("FAULT", json.dumps({"service": "trainer", "fault": "SIGKILL", "in": 400, "out": 50 * 8,
                               "resumed_at_step": resumed_at, "trained_after_resume": result["patterns"],
                               "raw_duplicates": 0, "lost": 0}))


def scorer_setup(bus_cfg, tmp_path, n_live: int):
    import random

    from services.classifier import ClassifyConfig, fit_all

    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    rng = random.Random(0)
    for i in range(120):
        bus.send(Output(SAMPLES, sample(i, i % 2 == 0)))
        for a in assignments(i, i % 2 == 0, rng):
            bus.send(Output(ASSIGNMENTS, a))
    bus.flush()
    fit_all(ClassifyConfig(**vars(bus_cfg), iterations=60, depth=4, folds=3, threads=2, out_dir=tmp_path / "rep"))
    live = []
    for i in range(1000, 1000 + n_live):
        live += assignments(i, i % 2 == 0, rng)
    rng.shuffle(live)
    for a in live:
        bus.send(Output(ASSIGNMENTS, a, key=a.sample_id))
    bus.flush()
    return bus, {f"s{i}" for i in range(1000, 1000 + n_live)} | {f"s{i}" for i in range(120)}


def test_classifier_killed_mid_batch_then_restarted(bus_cfg, tmp_path):
    bus, expected = scorer_setup(bus_cfg, tmp_path, 1500)
    args = ["classify", "serve", "--idle-timeout", "10", "--threads", "1"]
    proc = start(args, bus_cfg)
    wait_then(proc, lambda: count_so_far(bus, SCORES)() >= 150, lambda: sigkill(proc))
    # the restart waits out the dead member's session before its partitions come back
    finish(start(["classify", "serve", "--idle-timeout", "30", "--threads", "1"], bus_cfg))
    scores = [m.record.sample_id for m in read_range(bus, SCORES)]
    account("classifier", expected, scores, ids(bus, DEADLETTER), fault="SIGKILL")


# -- Redis stopped and restarted ------------------------------------------------------------
def test_redis_restart_mid_run_loses_nothing(bus_cfg, tmp_path, infra_cfg):
    bus, expected = scorer_setup(bus_cfg, tmp_path, 1500)
    redis_server = next(s for s in servers(infra_cfg, ("redis",)))
    args = ["classify", "serve", "--idle-timeout", "20", "--threads", "1"]
    proc = start(args, bus_cfg)

    def outage() -> None:
        redis_server.stop()
        time.sleep(3)  # the scorer keeps polling, fails its batches, backs off
        redis_server.start()

    wait_then(proc, lambda: count_so_far(bus, SCORES)() >= 150, outage)
    out = finish(proc)
    assert json.loads(out.strip().splitlines()[-1])["service"] == "classifier"
    scores = [m.record.sample_id for m in read_range(bus, SCORES)]
    account("classifier", expected, scores, ids(bus, DEADLETTER), fault="Redis stop + restart")
    assert not ids(bus, DEADLETTER)  # an outage is retried, never dead-lettered


# -- a consumer group rebalance while messages are in flight ---------------------------------
def test_rebalance_when_a_second_worker_joins(bus_cfg, tmp_path):
    bus, expected = scorer_setup(bus_cfg, tmp_path, 1500)
    args = ["classify", "serve", "--idle-timeout", "15", "--threads", "1"]
    first = start(args, bus_cfg)
    second: list[subprocess.Popen] = []
    wait_then(first, lambda: count_so_far(bus, SCORES)() >= 150, lambda: second.append(start(args, bus_cfg)))
    finish(first)
    finish(second[0])
    scores = [m.record.sample_id for m in read_range(bus, SCORES)]
    account("classifier", expected, scores, ids(bus, DEADLETTER), fault="rebalance (2nd worker joins)")


# -- the (in-memory) broker stopped and restarted ---------------------------------------------
def test_broker_restart_is_detected_said_and_survived(bus_cfg, infra_cfg, redis_client):
    """The embedded broker forgets every topic and offset when it restarts. The encoder must
    keep running, say so (log + apmae_offsets_reset_total), and process everything published
    after the restart from its first offset: nothing after the restart is skipped."""
    import torch

    from apmae.mae import APMAE, save, variant
    from services.registry import sha256_file

    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    patterns(bus, 600)
    torch.manual_seed(0)
    d = save(APMAE(variant("small", pattern_size=64, patch_size=16)), bus_cfg.artifacts_dir / "ck1")
    redis_client.hset("apmae:registry:apmae:brk", mapping={"path": "ck1", "step": 1,
                                                         "sha256": sha256_file(d / "model.safetensors")})
    proc = start(["encode", "--checkpoint", "brk", "--batch-size", "16", "--idle-timeout", "60"], bus_cfg)
    broker = next(s for s in servers(infra_cfg, ("broker",)))

    def restart() -> None:
        broker.stop()
        time.sleep(2)
        broker.start()

    wait_then(proc, lambda: count_so_far(bus, EMBEDDINGS)() >= 100, restart)
    bus = Bus(bus_cfg, "test")  # the test's own clients reconnect too
    bus.ensure_topics()
    # new work after the restart, fewer messages than the encoder had consumed
    after = patterns(bus, 200, tag="after", topics=(PATTERNS_MINE,))
    out, log = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    embs = [m.record.sample_id for m in read_range(bus, EMBEDDINGS)]
    account("encoder", after, [e for e in embs if e.startswith("after")], ids(bus, DEADLETTER),
            fault="broker stop + restart (topics lost)")
    assert "broker restarted" in log, log[-3000:]
