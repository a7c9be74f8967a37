"""Encoder, the Kafka fit-job queue and live assignment, on the real broker and Redis."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
import torch

from apmae.cluster import ClusterConfig
from apmae.codec import encode_pattern
from apmae.mae import APMAE, save_pretrained, variant
from apmae.topics import (
    ASSIGNMENTS,
    EMBEDDINGS,
    FIT_JOBS,
    PATTERNS_MINE,
    EmbeddingRecord,
    PatternRecord,
)
from services.bus import Bus, Output, read_range
from services.cluster import Assigner, ClusterServiceConfig, FitWorker, plan
from services.encoder import Encoder, EncoderConfig

HEADS = [("m", 0, 0), ("m", 0, 1), ("m", 1, 0)]


def synthetic_embeddings(bus, n_per_head: int, seed: int = 0, tag: str = "ck@1", offset: int = 0):
    rng = np.random.default_rng(seed)
    truth = {}
    for model, layer, head in HEADS:
        centres = np.random.default_rng(layer * 10 + head).normal(size=(3, 32)) * 4
        for i in range(n_per_head):
            g = int(rng.integers(3))
            v = (centres[g] + rng.normal(size=32)).astype("<f4")
            rec = EmbeddingRecord(id=f"e{layer}{head}-{offset + i}", sample_id=f"s{offset + i}", model=model,
                                  task="identifier", layer=layer, head=head, correct=bool(i % 2), checkpoint=tag,
                                  dim=32, payload=v.tobytes())
            bus.send(Output(EMBEDDINGS, rec, key=f"{model}/{layer}/{head}"))
            truth[rec.id] = g
    bus.flush()
    return truth


class Died(BaseException):
    """Like SIGKILL, nothing in the service can catch it."""


def test_fit_queue_fits_every_head_exactly_once_when_a_worker_dies(bus_cfg, redis_client):
    from sklearn.metrics import adjusted_rand_score

    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    truth = synthetic_embeddings(bus, 90)
    synthetic_embeddings(bus, 10, seed=7, tag="ck@0", offset=3000)  # an older checkpoint's embeddings
    cfg = ClusterServiceConfig(**vars(bus_cfg), cluster=ClusterConfig(min_cluster_size=10, min_samples=5), version="v1")
    p = plan(cfg)
    assert p["jobs"] == 3 and p["checkpoint"] == "ck@1" and p["other_checkpoints"] == 30  # one space per fit

    first = FitWorker(cfg)
    fitted = []

    def die_on_second_job(msgs):
        if fitted:
            raise Died("SIGKILL mid-way")
        out = FitWorker.handle(first, msgs)
        fitted.append(msgs[0].record.head)
        return out

    proc = first.processor()
    proc.handler = die_on_second_job
    with pytest.raises(Died):
        proc.run(idle_timeout_s=20)
    proc.consumer = None
    second = FitWorker(cfg).processor()
    assert second.run(idle_timeout_s=8) >= 2  # the unfinished jobs are re-delivered
    counts = {k: int(redis_client.get(f"apmae:cluster:fits:{bus_cfg.topic_prefix}v1:{'/'.join(map(str, k))}") or 0)
              for k in HEADS}
    assert counts == dict.fromkeys(HEADS, 1), counts  # each head fitted once

    assigned = {m.record.id.split("#")[0]: m.record.cluster for m in read_range(bus, ASSIGNMENTS)}
    assert set(assigned) == set(truth)
    assert {m.record.checkpoint for m in read_range(bus, ASSIGNMENTS)} == {"ck@1"}
    for layer, head in [(0, 0), (0, 1), (1, 0)]:
        ids = [i for i in truth if i.startswith(f"e{layer}{head}-")]
        ari = adjusted_rand_score([truth[i] for i in ids], [assigned[i] for i in ids])
        assert ari > 0.9, (layer, head, ari)

    # live assignment of new embeddings to the fitted clusters
    new = synthetic_embeddings(bus, 20, seed=5, offset=1000)
    newer = synthetic_embeddings(bus, 5, seed=6, tag="ck@2", offset=2000)  # a later checkpoint's space
    a = Assigner(cfg)
    a.processor().run(idle_timeout_s=8)
    live = {m.record.id.split("#")[0]: m.record for m in read_range(bus, ASSIGNMENTS)}
    for layer, head in [(0, 0), (0, 1), (1, 0)]:
        ids = [i for i in new if i.startswith(f"e{layer}{head}-")]
        ari = adjusted_rand_score([new[i] for i in ids], [live[i].cluster for i in ids])
        assert ari > 0.8, (layer, head, ari)
    assert all(live[i].cluster_version == "v1" and live[i].checkpoint == "ck@1" for i in new)
    assert not set(newer) & set(live)  # never assigned to clusters fitted in another embedding space


def test_encoder_embeds_and_hot_swaps_checkpoints(bus_cfg, redis_client):
    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    g = np.random.default_rng(0)
    for i in range(6):
        logits = g.normal(size=(64, 64))
        logits[np.triu_indices(64, 1)] = -np.inf
        a = np.exp(logits - logits.max(1, keepdims=True))
        bus.send(Output(PATTERNS_MINE, PatternRecord(id=f"p{i}", sample_id=f"s{i}", model="m", task="identifier",
                                                     layer=0, head=i % 2, correct=True, size=64,
                                                     payload=encode_pattern(a / a.sum(1, keepdims=True)))))
    bus.flush()
    from services.registry import apmae_key, sha256_file

    def register(step: int, seed: int):
        torch.manual_seed(seed)
        d = save_pretrained(APMAE(variant("tiny", pattern_size=64, patch_size=16)), bus_cfg.artifacts_dir / f"ck{step}")
        redis_client.hset(apmae_key(bus_cfg.topic_prefix, "enc"), mapping={"path": f"ck{step}", "step": step,
                                                             "sha256": sha256_file(d / "model.safetensors")})

    register(1, 0)
    enc = Encoder(EncoderConfig(**vars(bus_cfg), checkpoint="enc", reload_check_s=0))
    enc.processor().run(max_messages=3, idle_timeout_s=15)
    register(2, 1)  # a new checkpoint is announced: picked up without a restart
    enc.processor().run(max_messages=3, idle_timeout_s=15)
    embs = [m.record for m in read_range(bus, EMBEDDINGS)]
    assert len(embs) == 6 and all(e.dim == 64 for e in embs)
    assert Counter(e.checkpoint for e in embs) == {"enc@1": 3, "enc@2": 3}
    assert len(list(read_range(bus, FIT_JOBS))) == 0


def test_the_encoder_reads_batches_ahead_and_embeds_them_as_it_does_in_line(bus_cfg, tmp_path):
    """With a core to spare the Processor's helper reads the next batch's payloads
    (``Encoder.prepare``) beside the forward: every batch but the first (polled in line) is
    read ahead, each read is what reading that batch in line gives, the embeddings match an
    encoder's that reads in line, and a payload of the wrong length or with a NaN is
    dead-lettered either way."""
    from prometheus_client import REGISTRY

    from apmae.codec import read_packed
    from apmae.topics import DEADLETTER
    from services.bus import Processor

    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    g = np.random.default_rng(1)
    payloads = []
    for _ in range(24):
        logits = g.normal(size=(64, 64))
        logits[np.triu_indices(64, 1)] = -np.inf
        a = np.exp(logits - logits.max(1, keepdims=True))
        payloads.append(encode_pattern(a / a.sum(1, keepdims=True)))
    nan = bytearray(payloads[0])
    nan[10:12] = np.array([0x7FC0], "<u2").tobytes()  # a bfloat16 NaN
    payloads[5], payloads[17] = payloads[5][:-2], bytes(nan)  # one short payload, one NaN
    for i, p in enumerate(payloads):
        bus.send(Output(PATTERNS_MINE, PatternRecord(id=f"p{i}", sample_id=f"s{i}", model="m", task="identifier",
                                                     layer=0, head=i % 2, correct=True, size=64, payload=p)))
    bus.flush()
    torch.manual_seed(0)
    ckpt = save_pretrained(APMAE(variant("tiny", pattern_size=64, patch_size=16)), tmp_path / "ck")

    def reads(where: str) -> float:
        return REGISTRY.get_sample_value("apmae_encoder_batches_read_total", {"where": where}) or 0

    def run(group: str, ahead: bool) -> tuple[float, float]:
        enc = Encoder(EncoderConfig(**vars(bus_cfg), checkpoint=str(ckpt), batch_size=4, group=group))
        proc = enc.processor()
        proc.prefetch, proc.overlap_ending, proc.prefetch_min_s = ahead, ahead, 0
        if not ahead:
            proc.prepare = None

        seen = [0]

        def handle(msgs):  # the next batch, fetched beside this one, is read before this one ends
            seen[0] += len(msgs)
            mine = Encoder.read_key(msgs, 64)
            deadline = time.monotonic() + 5  # well inside the group's poll interval (8 s)
            while ahead and seen[0] < 24 and time.monotonic() < deadline and not any(
                    k != mine for k in list(enc.read_ahead)):
                time.sleep(0.01)
            return enc.handle(msgs)

        def checked_read(batch, size):  # each read, ahead or not, is the batch's read in line
            got = read(batch, size)
            want = read_packed([m.record.payload for m in batch], size, batch[0].record.dtype)
            reads_match.append(np.array_equal(got[0], want[0]) and got[1:] == want[1:])
            return got

        read, enc.read = enc.read, checked_read
        proc.handler = handle
        enc.ensure_model()  # prepare reads nothing before the model is loaded (the first handle loads it)
        before = reads("ahead"), reads("inline")
        assert isinstance(proc, Processor) and proc.run(max_messages=24, idle_timeout_s=15) == 24
        return reads("ahead") - before[0], reads("inline") - before[1]

    reads_match: list[bool] = []
    ahead_reads, inline_reads = run("enc-ahead", ahead=True)
    assert inline_reads == 1 and ahead_reads >= 5  # the first batch, polled in line, is read in line
    assert len(reads_match) == ahead_reads + inline_reads and all(reads_match)
    ahead_reads, inline_reads = run("enc-inline", ahead=False)
    assert ahead_reads == 0 and inline_reads >= 6
    embs: dict[str, list[np.ndarray]] = {}
    for m in read_range(bus, EMBEDDINGS):
        embs.setdefault(m.record.id.split("@")[0], []).append(np.frombuffer(m.record.payload, "<f4"))
    assert sorted(embs) == sorted(f"p{i}" for i in range(24) if i not in (5, 17))
    # the same model on the same patterns (batches may split differently: low bits may differ)
    assert all(len(v) == 2 and np.allclose(v[0], v[1], atol=1e-5) for v in embs.values())
    dead = sorted(m.record.reason.split(" is ")[0].split(" has ")[0] for m in read_range(bus, DEADLETTER))
    # the two bad patterns, once for each group
    assert dead == ["decoded pattern", "decoded pattern", "pattern payload", "pattern payload"], dead

    # a topic recreated with its offsets reused: a read kept for the old payloads at those
    # offsets is not used for the new ones
    from services.bus import Message

    enc = Encoder(EncoderConfig(**vars(bus_cfg), checkpoint=str(ckpt), batch_size=4))
    enc.ensure_model()

    def at_offsets_0_to_3(ps):
        return [Message(PATTERNS_MINE.name, 0, i, 0, None, b"", PatternRecord(
            id=f"q{i}", sample_id="s", model="m", task="identifier", layer=0, head=0, correct=True, size=64,
            payload=p)) for i, p in enumerate(ps)]

    enc.prepare(at_offsets_0_to_3(payloads[:4]))
    bits, kept, bad = enc.read(at_offsets_0_to_3(payloads[8:12]), 64)
    assert np.array_equal(bits, read_packed(payloads[8:12], 64)[0]) and kept == [0, 1, 2, 3] and not bad


def test_a_fit_worker_process_that_dies_ends_the_pool_instead_of_hanging_it(bus_cfg, redis_client, monkeypatch):
    """``cluster worker --processes N``: a worker process killed mid-job (SIGKILL after its
    first fit's outputs are flushed, before its done marks) hung the command forever
    (a multiprocessing.Pool replaces the dead process, and the lost result never comes). Now
    the pool ends and the caller hears of it: ``on_broken`` (the command starts itself again)
    or BrokenProcessPool. Nothing is lost: a clean worker then fits every head."""
    import threading
    from concurrent.futures.process import BrokenProcessPool
    from dataclasses import replace

    from services.bus import RunLimits
    from services.cluster import run_workers

    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    synthetic_embeddings(bus, 90)
    cfg = ClusterServiceConfig(**vars(bus_cfg), cluster=ClusterConfig(min_cluster_size=10, min_samples=5),
                               version="v1", processes=2)
    assert plan(cfg)["jobs"] == 3
    # the spawned workers read it at import: each dies at its first fit, after the flush
    monkeypatch.setenv("APMAE_FAILPOINTS", "after-flush=kill@1")
    outcome: list = []

    def run(**kw) -> None:
        try:
            outcome.append(run_workers(cfg, RunLimits(idle_timeout_s=20), **kw))
        except BaseException as e:  # noqa: BLE001 - the outcome is what the test checks
            outcome.append(e)

    broken: list[int] = []
    for kw in ({}, {"on_broken": broken.append}):
        t = threading.Thread(target=run, kwargs=kw, daemon=True)
        t.start()
        t.join(600)  # a hang is the failure this test is about; 600 s is far past any healthy run
        assert not t.is_alive(), "run_workers hung after a worker process died"
    assert isinstance(outcome[0], BrokenProcessPool), outcome
    assert len(broken) == 1 and outcome[1] == broken[0]  # on_broken heard of it, with the heads done meanwhile
    monkeypatch.delenv("APMAE_FAILPOINTS")
    run_workers(replace(cfg, processes=1), RunLimits(idle_timeout_s=8))
    from services.registry import Registry

    fitted = Registry(redis_client, bus_cfg.topic_prefix).names("cluster")
    assert fitted == sorted(f"{m}/{layer}/{head}" for m, layer, head in HEADS), fitted
