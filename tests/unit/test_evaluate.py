"""Evaluations count samples, not patterns: the size limit, n and the interval."""

from __future__ import annotations

import random

import torch

from apmae import evaluate as E


def stream(n_samples: int, heads: int, seed: int = 0):
    """(model, sample id, pattern id) in the order a topic keyed by head delivers them:
    partition by partition, i.e. the same head of every sample first."""
    out = [("m", f"s{i}", f"s{i}:m:0:{h}") for h in range(heads) for i in range(n_samples)]
    random.Random(seed).shuffle(out[: heads])  # a little disorder inside the first partition
    return out


def test_limit_counts_samples_and_draws_heads_without_order_bias():
    pick = E.SampleSelection(limit=10, per_sample=3, seed=0)
    for model, sid, pid in stream(200, 12):
        if pick.wants(model, sid, pid):
            pick.offer(model, sid, pid, pid)
    items, ids = pick.result()["m"]
    assert len(set(ids)) == 10 and len(items) == 30  # 10 samples x 3 heads, not 30 samples' first head
    heads = {int(p.rsplit(":", 1)[1]) for p in items}
    assert len(heads) > 3  # not the heads that happened to arrive first
    # the same selection whatever the arrival order
    again = E.SampleSelection(limit=10, per_sample=3, seed=0)
    for model, sid, pid in reversed(stream(200, 12)):
        again.offer(model, sid, pid, pid)
    assert sorted(again.result()["m"][0]) == sorted(items)


def test_no_limit_keeps_everything():
    pick = E.SampleSelection()
    for model, sid, pid in stream(5, 4):
        pick.offer(model, sid, pid, pid)
    items, ids = pick.result()["m"]
    assert len(items) == 20 and len(set(ids)) == 5


def test_summary_n_is_in_samples_and_the_interval_resamples_samples():
    losses = torch.tensor([1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    ids = ["a"] * 4 + ["b"] * 4
    s = E.summary(losses, ids)
    assert s["n"] == 2 and s["n_samples"] == 2 and s["n_patterns"] == 8
    lo, hi = s["ci95"]
    assert lo == 1.0 and hi == 3.0  # two samples: a resample is all a, all b, or both
    assert E.summary(losses)["n"] == 8  # without sample ids it can only count patterns


def test_eval_limit_takes_samples_from_a_parquet_source(tmp_path):
    """``apmae eval --limit 4``: 4 samples (every head of each with per_sample 0), n = 4 in the table."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from apmae.codec import encode_pattern
    from apmae.config import BusConfig
    from apmae.messages import encode
    from apmae.topics import PatternRecord
    from services.evaluate import load_patterns

    a = np.tril(np.ones((32, 32), dtype=np.float32))
    a /= a.sum(1, keepdims=True)
    values = [encode(PatternRecord(id=f"s{i}:m:0:{h}", sample_id=f"s{i}", model="m", task="random", layer=0,
                                   head=h, correct=True, size=32, dtype="float32",
                                   payload=encode_pattern(a, "float32")))
              for h in range(6) for i in range(30)]
    pq.write_table(pa.table({"value": values}), tmp_path / "p.parquet")
    got = load_patterns(BusConfig(), f"parquet:{tmp_path / 'p.parquet'}", limit=4, size=32)
    x, ids = got["m"]
    assert len(set(ids)) == 4 and x.shape == (24, 32, 32)  # was: the first 4 patterns, head 0 of 4 samples
    s = E.summary(torch.zeros(len(ids)), ids)
    assert s["n"] == 4


def test_table2_cells_carry_a_mean_patch_baseline_fit_on_other_samples():
    torch.manual_seed(0)
    from tests.unit.test_mae import causal_patterns, small

    m = small()
    x = causal_patterns(24, seed=2)
    ids = [f"s{i // 3}" for i in range(24)]  # 8 samples x 3 heads
    table = E.cross_evaluation({"a": m}, {"m1": x}, samples={"m1": ids})
    cell = table["a"]["m1"]
    fit, ev = E.split_samples(ids, 0.5)
    assert {ids[i] for i in fit}.isdisjoint({ids[i] for i in ev})  # split by sample, never by pattern
    assert cell["n"] == len({ids[i] for i in ev}) and cell["n_patterns"] == len(ev)
    assert cell["baseline"]["n"] == cell["n"] and cell["baseline_fit_samples"] == len({ids[i] for i in fit})
    assert abs(cell["ratio"] / (cell["mean"] / cell["baseline"]["mean"]) - 1) < 1e-5
    assert "mean-patch baseline" in E.format_table(table)
