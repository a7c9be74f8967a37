"""The producer end to end against the real broker and Redis, on the tiny StarCoder2."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from apmae.codec import decode_pattern
from apmae.config import from_flat
from apmae.split import trains_apmae
from apmae.target import TargetModel
from apmae.topics import FILES, PATTERNS_MINE, PATTERNS_TRAIN, SAMPLES
from services.bus import Bus, Output, Retryable, read_range
from services.producer import Producer, ProducerConfig
from tests.conftest import java_files


def make(bus_cfg, tiny_model_dir, **kw) -> Producer:
    cfg = from_flat(ProducerConfig, **vars(bus_cfg), model=str(tiny_model_dir), **({"noise_every": 1} | kw))
    lm = TargetModel.load(cfg.model, cfg.model_cache, "cpu")
    return Producer(cfg, lm)


def test_producer_publishes_what_a_consumer_decodes(bus_cfg, tiny_model_dir):
    before = set(threading.enumerate())
    prod = make(bus_cfg, tiny_model_dir, mine_per_task=1000, balance_slack=1000)
    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    files = java_files(3)
    for f in files:
        bus.send(Output(FILES, f))
    bus.flush()
    assert prod.mode == "fim"  # the tiny tokenizer carries StarCoder2's sentinels
    assert prod.processor_for().run(max_messages=3, idle_timeout_s=30) == 3

    samples = [m.record for m in read_range(bus, SAMPLES)]
    tasks = Counter(s.task for s in samples)
    assert set(tasks) >= {"identifier", "closing_bracket", "end_of_line", "random", "noise"}, tasks
    assert len({s.id for s in samples}) == len(samples)
    assert {s.file_id for s in samples} == {f.id for f in files}
    for s in samples:
        assert (s.correct is None) == (s.task == "noise")
        assert s.correct == (s.predicted_token == s.target_token) or s.task == "noise"

    mined = [m.record for m in read_range(bus, PATTERNS_MINE)]
    per_sample = Counter(p.sample_id for p in mined)
    assert per_sample and set(per_sample.values()) == {2 * 4}  # all heads of all layers
    p = mined[0]
    a = decode_pattern(p.payload, p.size, p.dtype)
    assert a.shape == (256, 256) and np.allclose(a.sum(1), 1, atol=0.02) and np.all(np.triu(a, 1) == 0)
    assert {m.key.decode() for m in read_range(bus, PATTERNS_MINE)} <= {f"{prod.lm.name}/{layer}/{h}" for layer in range(2)
                                                                      for h in range(4)}

    # close: its publisher thread and its client's IO thread stop (neither outlives the stage)
    ours = {t for t in set(threading.enumerate()) - before
            if t.name.startswith("publish") or t.name == "producer-network-thread"}
    assert {t.name.split("_")[0] for t in ours} == {"publish", "producer-network-thread"}, ours
    prod.close()
    assert not [t.name for t in ours if t.is_alive()]
    assert prod.publisher().submit(lambda: 7).result(timeout=10) == 7  # usable again: the thread starts anew
    # closing after an error: a failing flush is logged, not raised over the error being handled
    def failing_close():
        raise Retryable("1 sends failed")

    prod.bus.close = failing_close
    prod.close(quietly=True)
    with pytest.raises(Retryable):
        prod.close()


def test_training_patterns_are_a_fresh_quarter_of_heads_per_layer(bus_cfg, tiny_model_dir):
    """Force every prediction right (the tiny model is random) to exercise the training path.

    32 random samples, half of them in the training split by their ids: sample ids name the
    model by its path (a fresh temporary directory each run), so the split differs per run,
    and with 8 samples one run in ~25 put a single sample in it (CI failed so: one subset)."""
    prod = make(bus_cfg, tiny_model_dir, mine_per_task=2, random_per_file=32, spans_per_task=0, noise_every=0,
                train_share=0.5)
    from services.bus import Message

    f = java_files(1, "train")[0]
    msg = Message("files", 0, 0, 0, None, b"", f)
    jobs = [j for j in prod.jobs_for(msg) if j.x.task == "random"]
    heads = prod.heads_to_capture(jobs, {"random": False}, torch.Generator().manual_seed(0))
    res = prod.lm.run([j.x for j in jobs], heads)
    res.predicted = torch.tensor([j.x.target_token for j in jobs])  # all correct
    outs = prod.outputs_for(jobs, res)
    train = [o.record for o in outs if o.topic is PATTERNS_TRAIN]
    by_sample: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for r in train:
        by_sample[r.sample_id][r.layer].append(r.head)
    # the training split is by sample, decided from ids (apmae.split): only its samples train
    in_split = {j.sample_id for j in jobs if trains_apmae("random", j.sample_id, j.file_id, prod.cfg.split)}
    assert set(by_sample) == in_split and 1 < len(in_split) < len(jobs) == 32
    for layers in by_sample.values():
        assert sorted(layers) == [0, 1] and all(len(h) == 1 for h in layers.values())  # 25% of 4 heads
    subsets = {tuple(tuple(v) for _, v in sorted(layers.items())) for layers in by_sample.values()}
    assert len(subsets) > 1  # fresh per sample, not one fixed choice (all alike: 16**-(n-1) for n in the split)
    mined = {o.record.sample_id for o in outs if o.topic is PATTERNS_MINE}
    assert len(mined) == 1  # mine_per_task=2 -> one correct slot; the balance holds the rest back
    assert not mined & set(by_sample)  # a sample that trains AP-MAE is never mined (it was: label leak)
    # deterministic: the same inputs give the same ids
    again = prod.outputs_for(jobs, res)
    assert [o.record.id for o in again if o.topic is PATTERNS_TRAIN] == [r.id for r in train]


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="counts threads through /proc (Linux)")
def test_a_cpu_forwards_patterns_are_encoded_beside_it_without_a_second_openmp_team(bus_cfg, tiny_model_dir):
    """The publisher thread encodes chunk k while chunk k+1's forward runs. On CPU it reads the
    patterns as numpy: a torch op there (the encoding as it was) gives it an OpenMP team of its
    own, beside which torch's work on the forward thread ran at ~0.8x (tests/openmp.py). Every
    kind of output is built on the side thread: samples, training heads (a fresh 25%), mined
    heads; the control shows the count would see the old encoding's team."""
    from apmae.codec import tril_indices
    from services.bus import Message
    from tests.openmp import workers_beside

    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: OpenMP makes no team to detect")
    prod = make(bus_cfg, tiny_model_dir, mine_per_task=1000, balance_slack=1000, random_per_file=16,
                noise_every=0, train_share=0.5)
    f = java_files(1, "team")[0]
    jobs = prod.jobs_for(Message("files", 0, 0, 0, None, b"", f))
    res = prod.lm.run([j.x for j in jobs], prod.heads_to_capture(jobs, {j.x.task: False for j in jobs},
                                                                  torch.Generator().manual_seed(0)))
    res.predicted = torch.tensor([j.x.target_token if j.x.target_token is not None else 0 for j in jobs])
    outs: list = []
    assert workers_beside(lambda: outs.extend(prod.outputs_for(jobs, res))) == 0
    assert {o.topic for o in outs} == {SAMPLES, PATTERNS_TRAIN, PATTERNS_MINE}
    rows, cols = (torch.from_numpy(i) for i in tril_indices(256))
    assert workers_beside(lambda: res.patterns[0][:, :, rows, cols].to(torch.bfloat16)) > 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_non_finite_heads_are_one_small_dead_letter_each(bus_cfg, tiny_model_dir, device):
    """Two bad heads in one layer: two dead letters (not one carrying the whole layer), with
    distinct ids, each that head's lower triangle; the layer's good heads still published.
    On CUDA too: the dead letter is built without calling .numpy() on a device tensor."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from apmae.topics import DEADLETTER
    from services.bus import Message

    prod = make(bus_cfg, tiny_model_dir, mine_per_task=1000, balance_slack=1000, noise_every=0)
    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    f = java_files(1, "nan")[0]
    jobs = [j for j in prod.jobs_for(Message("files", 0, 0, 0, None, b"", f)) if j.x.task != "random"][:1]
    res = prod.lm.run([j.x for j in jobs], prod.heads_to_capture(jobs, {jobs[0].x.task: False},
                                                                  torch.Generator().manual_seed(0)))
    res.patterns = {k: v.to(device) for k, v in res.patterns.items()}
    res.patterns[1][0, 1, 5, 2] = float("nan")
    res.patterns[1][0, 3, 9, 0] = float("inf")
    outs = prod.outputs_for(jobs, res)
    for o in outs:
        prod.bus.send(o)
    prod.bus.flush()
    dead = [m.record for m in read_range(bus, DEADLETTER)]
    sid = jobs[0].sample_id
    assert sorted(d.reason.split(": ")[0] for d in dead) == [f"{sid}:m:1:1", f"{sid}:m:1:3"]
    assert len({d.id for d in dead}) == 2
    assert all(len(d.payload) == 256 * 257 // 2 * 2 for d in dead)  # one head's lower triangle, bfloat16
    mined = {o.record.id for o in outs if o.topic is PATTERNS_MINE}
    assert mined == {f"{sid}:m:{layer}:{h}" for layer in range(2) for h in range(4)} - {f"{sid}:m:1:1", f"{sid}:m:1:3"}


@pytest.mark.parametrize("forward_full", [True, False])
def test_a_study_spends_no_forward_on_a_full_task(bus_cfg, tiny_model_dir, forward_full):
    """``forward_full_tasks=False``: a task whose quota is full gets no more forwards (its
    candidates would only add predictions); the others, and AP-MAE's training inputs, do."""
    prod = make(bus_cfg, tiny_model_dir, mine_per_task=2, noise_every=0, forward_full_tasks=forward_full)
    prod.redis.sadd(prod._set("identifier", True), "s1")  # identifier: one correct + one incorrect = full
    prod.redis.sadd(prod._set("identifier", False), "s2")
    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    bus.send(Output(FILES, java_files(1, "full")[0]))
    bus.flush()
    assert prod.processor_for().run(max_messages=1, idle_timeout_s=30) == 1
    tasks = Counter(m.record.task for m in read_range(bus, SAMPLES))
    assert tasks["random"] > 0 and tasks["end_of_line"] > 0
    assert (tasks["identifier"] > 0) == forward_full, tasks
