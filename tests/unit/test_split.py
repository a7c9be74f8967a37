"""Which samples train AP-MAE and which are mined: by sample, from ids, never both."""

from __future__ import annotations

import pytest
import torch

from apmae.split import (
    Split,
    heads_to_capture,
    is_held_out_file,
    route,
    training_heads,
    trains_apmae,
)


def test_a_training_sample_is_never_mined_and_only_random_samples_train():
    split = Split(train_share=0.5)
    ids = [f"s{i}" for i in range(2000)]
    for task in ("identifier", "string_literal", "noise"):
        for s in ids[:200]:
            r = route(task, True, s, "f", split)
            assert r == route(task, True, s, "f", split)  # deterministic
            assert r.mine and not r.train
    for s in ids:
        right, wrong = route("random", True, s, "f", split), route("random", False, s, "f", split)
        assert not (right.train and right.mine) and not wrong.train
        assert right.mine == wrong.mine  # the split is decided before the prediction is known
        assert right.train == (not right.mine)  # in the training split: trains when right, never mined
    share = sum(trains_apmae("random", s, "f", split) for s in ids) / len(ids)
    assert share == pytest.approx(0.5, abs=0.04)


def test_held_out_files_never_train():
    split = Split(train_share=1.0, held_out_files=0.3)
    files = [f"file{i}" for i in range(1000)]
    held = [f for f in files if is_held_out_file(f, split)]
    assert len(held) / len(files) == pytest.approx(0.3, abs=0.05)
    for f in held:
        assert route("random", True, f"{f}:s", f, split).mine
    for f in set(files) - set(held):
        assert route("random", True, f"{f}:s", f, split).train


def test_shares_are_checked():
    with pytest.raises(ValueError, match="train_share"):
        Split(train_share=1.5)


def test_heads_to_capture_all_heads_when_any_sample_may_be_mined_else_a_quarter():
    split, g = Split(), torch.Generator().manual_seed(0)
    full = heads_to_capture([True, False], [False, True], 3, 8, split, g)
    assert sorted(full) == [0, 1, 2] and all(v.shape == (2, 8) for v in full.values())
    quarter = heads_to_capture([True, True], [False, False], 3, 8, split, g)
    assert all(v.shape == (2, 2) for v in quarter.values())
    assert heads_to_capture([False], [False], 3, 8, split, g) == {}
    draws = {tuple(training_heads(16, split, g).tolist()) for _ in range(20)}
    assert len(draws) > 10 and all(len(d) == 4 for d in draws)  # a fresh 25% per layer and sample
