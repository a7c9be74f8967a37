"""The trainer on the real broker and Redis: exact resume, dead letters, registry, DDP on CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from apmae.codec import encode_pattern, packed_length
from apmae.recipe import TrainingConfig
from apmae.topics import CHECKPOINTS, DEADLETTER, PATTERNS_TRAIN, PatternRecord
from services.bus import Bus, Output, read_range
from services.trainer import Trainer, TrainerConfig, latest_checkpoint

SIZE = 64


def pattern(seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    logits = g.normal(size=(SIZE, SIZE)) * 3
    logits[np.triu_indices(SIZE, 1)] = -np.inf
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def publish(bus_cfg, n: int, bad: int = 0, model: str = "m") -> list[str]:
    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    ids = []
    for i in range(n):
        rec = PatternRecord(id=f"{model}-p{i}", sample_id=f"s{i}", model=model, task="random", layer=i % 5, head=i % 3,
                            correct=True, size=SIZE, payload=encode_pattern(pattern(i)))
        bus.send(Output(PATTERNS_TRAIN, rec, key=f"m/{i % 5}/{i}"))
        ids.append(rec.id)
    for j in range(bad):  # NaN payload: must be dead-lettered, never trained on
        nan = np.full(packed_length(SIZE), 0x7FC0, dtype=np.uint16).tobytes()
        bus.send(Output(PATTERNS_TRAIN, PatternRecord(id=f"bad{j}", sample_id="x", model="m", task="random", layer=0,
                                                      head=0, correct=True, size=SIZE, payload=nan)))
    bus.flush()
    return ids


RECIPE = {f.name for f in dataclasses.fields(TrainingConfig)}


def cfg(bus_cfg, **kw) -> TrainerConfig:
    """The trainer's config; keyword arguments of the recipe (steps, epochs...) go into it."""
    base = dict(variant="tiny", pattern_size=SIZE, patch_size=16, batch_size=8, steps=100, checkpoint_every=3,
                name="t", idle_timeout_s=8.0) | kw
    recipe = TrainingConfig(**{k: v for k, v in base.items() if k in RECIPE})
    return TrainerConfig(**vars(bus_cfg), train=recipe, **{k: v for k, v in base.items() if k not in RECIPE})


class Crash(Exception):
    pass


def test_resume_from_checkpoint_consumes_exactly_the_remaining_messages(bus_cfg):
    all_ids = publish(bus_cfg, 100, bad=2)
    first: list[str] = []

    def crash_at_7(ids):
        first.extend(ids)
        if len(first) >= 7 * 8:
            raise Crash

    with pytest.raises(Crash):
        Trainer(cfg(bus_cfg), on_batch=crash_at_7).run()
    ckpt = latest_checkpoint(cfg(bus_cfg).run_dir)
    meta = json.loads((ckpt / "trainer_state.json").read_text())
    assert meta["step"] == 6
    trained_before_ckpt = first[:48]

    second: list[str] = []
    t = Trainer(cfg(bus_cfg), on_batch=second.extend)
    assert t.step == 6 and t.resumed_from == str(ckpt)
    out = t.run()
    assert not set(second) & set(trained_before_ckpt)  # nothing twice
    assert len(second) == 48 and out["step"] == 12  # 52 left: 6 full batches, 4 wait for more data
    assert set(trained_before_ckpt) | set(second) <= set(all_ids)
    assert len(set(trained_before_ckpt) | set(second)) == 96  # nothing skipped
    # the loss curve survives the crash: steps 1-6 from the checkpoint, 7-12 from the resumed run
    history = json.loads((latest_checkpoint(cfg(bus_cfg).run_dir) / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history] == list(range(1, 13)) and all(h["loss"] > 0 for h in history)

    dead = [m.record for m in read_range(Bus(bus_cfg), DEADLETTER)]
    # each bad pattern is dead-lettered (re-reading one after the resume repeats its
    # deterministic id, which is how a reader of the dead-letter topic drops the repeat)
    assert len({d.id for d in dead}) == 2
    assert {d.reason for d in dead} == {"decoded pattern has non-finite values"}


def test_one_ap_mae_per_target_model(bus_cfg):
    mine = publish(bus_cfg, 24, model="a")
    publish(bus_cfg, 24, model="b")
    seen: list[str] = []
    out = Trainer(cfg(bus_cfg, name="only-a", target_model="a"), on_batch=seen.extend).run()
    assert out["step"] == 3 and sorted(seen) == sorted(mine)  # every "a" pattern, no "b" pattern
    dead = list(read_range(Bus(bus_cfg), DEADLETTER))
    assert not dead  # another model's patterns are passed over, not dead-lettered


def test_checkpoints_are_announced_to_the_registry(bus_cfg, redis_client):
    publish(bus_cfg, 24)
    out = Trainer(cfg(bus_cfg, name="reg", checkpoint_every=2)).run()
    assert out["step"] == 3
    anns = [m.record for m in read_range(Bus(bus_cfg), CHECKPOINTS)]
    assert [a.step for a in anns] == [2, 3]
    from services.registry import apmae_key

    h = redis_client.hgetall(apmae_key(bus_cfg.topic_prefix, "reg"))
    assert int(h[b"step"]) == 3 and h[b"sha256"].decode() == anns[-1].sha256
    assert (cfg(bus_cfg).artifacts_dir / anns[-1].path / "model.safetensors").exists()


def test_ddp_on_cpu_with_two_processes(bus_cfg, tmp_path):
    publish(bus_cfg, 80)
    env = os.environ | {f"APMAE_{k.upper()}": str(v) for k, v in vars(bus_cfg).items()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "services.trainer", "--variant", "tiny", "--pattern-size", str(SIZE), "--patch-size", "16",
           "--batch-size", "4", "--steps", "5", "--checkpoint-every", "5", "--name", "ddp", "--idle-timeout-s", "10"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["step"] == 5 and result["patterns"] == 20  # rank 0's share of the global batch of 8
    meta = json.loads((latest_checkpoint(cfg(bus_cfg, name="ddp").run_dir) / "trainer_state.json").read_text())
    assert meta["world_size"] == 2
    # Batches are drawn from shuffled blocks, so a partition's progress is its watermark (every
    # offset below it trained) plus the offsets above it already trained. Both ranks' partitions:
    # 5 steps x 2 ranks x 4 patterns.
    above = {int(p): v for p, v in meta["trained_above"].items()}
    trained = {int(p): o + len(above.get(int(p), [])) for p, o in meta["offsets"].items()}
    assert sum(trained.values()) == 40
    assert all(min(v) >= meta["offsets"][str(p)] for p, v in above.items())
    assert {p % 2 for p, n in trained.items() if n > 0} == {0, 1}


def test_batches_are_shuffled_across_heads_and_a_resent_pattern_is_trained_once(bus_cfg):
    """Partitions are keyed by head: batches in arrival order would hold one partition's heads.
    The shuffle block mixes them; a pattern re-sent with the same id (a producer retry) is
    trained once."""
    ids = publish(bus_cfg, 64)
    bus = Bus(bus_cfg, "test")
    again = PatternRecord(id=ids[5], sample_id="s5", model="m", task="random", layer=0, head=0, correct=True,
                          size=SIZE, payload=encode_pattern(pattern(5)))
    bus.send(Output(PATTERNS_TRAIN, again, key="m/0/5"))
    bus.flush()
    batches: list[list[str]] = []
    out = Trainer(cfg(bus_cfg, name="shuf", shuffle_window=64), on_batch=batches.append).run()
    seen = [i for b in batches for i in b]
    assert sorted(seen) == sorted(ids) and out["step"] == 8  # each once, the re-sent copy dropped
    assert out["duplicates_dropped"] == 1
    # arrival order would give batches of consecutive offsets of one partition (keys m/{i%5}/{i}
    # spread over 8 partitions); shuffled, the first batch's patterns come from several partitions
    part_of = {}
    for m in read_range(bus, PATTERNS_TRAIN):
        part_of.setdefault(m.record.id, m.partition)
    assert len({part_of[i] for i in batches[0]}) >= 3


def test_epochs_train_every_pattern_once_per_pass_and_a_resume_continues_inside_the_pass(bus_cfg):
    """A fixed training set read ``epochs`` times: every pattern exactly once per pass, and a
    crash in the second pass resumes inside it (the watermarks are per epoch): still three
    times each, nothing twice within a pass."""
    from collections import Counter

    ids = publish(bus_cfg, 40)  # 5 full batches of 8 per pass
    run = dict(name="epochs", epochs=3, steps=15)
    first: list[str] = []

    def crash_at_8(batch):
        first.extend(batch)
        if len(first) >= 8 * 8:
            raise Crash

    with pytest.raises(Crash):
        Trainer(cfg(bus_cfg, **run), on_batch=crash_at_8).run()
    meta = json.loads((latest_checkpoint(cfg(bus_cfg, **run).run_dir) / "trainer_state.json").read_text())
    assert meta["step"] == 6 and meta["epoch"] == 1  # the checkpoint is one batch into the second pass

    second: list[str] = []
    out = Trainer(cfg(bus_cfg, **run), on_batch=second.extend).run()
    assert out["step"] == 15 and out["epoch"] == 3
    counts = Counter(first[:48] + second)
    assert set(counts) == set(ids) and set(counts.values()) == {3}
    # within each pass of the resumed run, no pattern twice (passes 2-rest, then 3)
    assert len(set(second[:32])) == 32 and len(set(second[32:])) == 40


def test_one_epoch_waits_at_the_end_of_the_stream(bus_cfg):
    """The default is a live stream: at the end of the topic the trainer waits for new
    patterns (and stops at its idle timeout) instead of reading the topic again."""
    ids = publish(bus_cfg, 24)
    seen: list[str] = []
    out = Trainer(cfg(bus_cfg, name="once", idle_timeout_s=3.0), on_batch=seen.extend).run()
    assert out["step"] == 3 and sorted(seen) == sorted(ids) and out["epoch"] == 1


def test_a_batch_of_unknown_wire_dtypes_is_dead_lettered_and_training_goes_on(bus_cfg):
    """A wire dtype the codec does not know passes the read-time checks and is caught when the
    batch is stacked. A whole batch of them (8 such patterns, alone on the topic) left an empty
    batch for the training thread; mixed with good ones, its group must stack with theirs."""
    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    for j in range(8):
        bus.send(Output(PATTERNS_TRAIN, PatternRecord(
            id=f"f16-{j}", sample_id="x", model="m", task="random", layer=0, head=j % 3, correct=True, size=SIZE,
            dtype="float16", payload=encode_pattern(pattern(100 + j)))))
    bus.flush()
    out = Trainer(cfg(bus_cfg, steps=2, idle_timeout_s=4.0)).run()
    assert out["step"] == 0  # nothing to train, and no crash on an empty batch
    dead = [m.record for m in read_range(Bus(bus_cfg), DEADLETTER)]
    assert len(dead) == 8
    assert all("unknown wire dtype" in d.reason for d in dead)

    publish(bus_cfg, 16)
    for j in range(4):  # mixed into the good ones' batches
        bus.send(Output(PATTERNS_TRAIN, PatternRecord(
            id=f"f16-late-{j}", sample_id="x", model="m", task="random", layer=0, head=0, correct=True, size=SIZE,
            dtype="float16", payload=encode_pattern(pattern(200 + j)))))
    bus.flush()
    trained: list[str] = []
    out = Trainer(cfg(bus_cfg, steps=2, idle_timeout_s=4.0), on_batch=trained.extend).run()
    assert out["step"] == 2 and not any(i.startswith("f16") for i in trained)
