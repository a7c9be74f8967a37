"""Zeroing heads before o_proj is exactly removing their columns of o_proj; condition choice."""

from __future__ import annotations

import pytest
import torch

from apmae.intervene import as_heads, choose, zero_heads
from apmae.tiny import SAMPLE_JAVA, tiny_starcoder2, train_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny():
    tok = train_tokenizer([SAMPLE_JAVA] * 3, vocab_size=700)
    model = tiny_starcoder2(len(tok), layers=2, heads=4, kv_heads=2).eval()
    ids = torch.randint(10, len(tok), (2, 64), generator=torch.Generator().manual_seed(0))
    return model, ids


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_zeroed_heads_equal_zeroed_o_proj_columns(tiny):
    model, ids = tiny
    before = logits(model, ids)
    heads = {0: [1], 1: [0, 3]}
    with zero_heads(model, heads):
        hooked = logits(model, ids)
    assert (hooked - before).abs().max() > 1e-4  # the intervention changes the output

    layers = model.model.layers
    saved = {i: layers[i].self_attn.o_proj.weight.detach().clone() for i in heads}
    try:
        for i, hs in heads.items():
            attn = layers[i].self_attn
            for h in hs:
                attn.o_proj.weight.data[:, h * attn.head_dim:(h + 1) * attn.head_dim] = 0
        by_weights = logits(model, ids)
    finally:
        for i, w in saved.items():
            layers[i].self_attn.o_proj.weight.data.copy_(w)
    assert torch.allclose(hooked, by_weights, atol=1e-6)
    assert torch.equal(logits(model, ids), before)  # hooks removed on exit


def test_hooks_are_removed_even_when_the_block_raises(tiny):
    model, ids = tiny
    before = logits(model, ids)
    with pytest.raises(RuntimeError), zero_heads(model, {0: [0, 1, 2, 3]}):
        raise RuntimeError("boom")
    assert torch.equal(logits(model, ids), before)


def test_conditions_pick_from_the_importance_ranking():
    imp = {(layer, h): 0.0 for layer in range(3) for h in range(4)}
    imp.update({(2, 1): 0.9, (0, 3): 0.5, (1, 0): 0.4, (1, 1): 0.01})
    assert choose(imp, 3, "top") == [(2, 1), (0, 3), (1, 0)]
    neutral = choose(imp, 4, "neutral")
    assert all(imp[p] == 0.0 for p in neutral) and len(set(neutral)) == 4
    draws = [tuple(choose(imp, 4, "random", seed)) for seed in range(5)]
    assert len(set(draws)) > 1 and all(len(set(d)) == 4 for d in draws)
    assert as_heads([(0, 1), (2, 3), (0, 2)]) == {0: [1, 2], 2: [3]}
    with pytest.raises(ValueError):
        choose(imp, 2, "largest")


def test_paired_effect_is_mcnemar_on_the_flips():
    import numpy as np

    from apmae.intervene import paired_effect

    base = np.array([True] * 30 + [False] * 10)
    got = base.copy()
    got[:12] = False  # 12 right predictions lost, none gained
    e = paired_effect(base, got)
    assert e["lost"] == 12 and e["gained"] == 0 and e["flipped"] == 12 and e["delta"] == -12 / 40
    assert abs(e["p_value"] - 2 * 0.5 ** 12) < 1e-12  # exact two-sided binomial on the 12 discordant pairs
    same = paired_effect(base, base)
    assert same["p_value"] == 1.0 and same["delta"] == 0.0
    mixed = base.copy()
    mixed[:3], mixed[30:33] = False, True  # 3 lost, 3 gained: no change in rate, no evidence
    assert paired_effect(base, mixed)["p_value"] == 1.0


def test_summary_ranks_top_heads_among_random_draws():
    from apmae.intervene import summarise

    rows = [{"task": "t", "condition": "none", "n": 40, "correct_rate": 0.75, "delta": 0.0},
            {"task": "t", "condition": "top", "n": 40, "correct_rate": 0.5, "delta": -0.25, "p_value": 0.001},
            {"task": "t", "condition": "neutral", "n": 40, "correct_rate": 0.75, "delta": 0.0, "p_value": 1.0}]
    rows += [{"task": "t", "condition": "random", "n": 40, "correct_rate": 0.7, "delta": d, "p_value": 0.5}
             for d in [-0.3] + [-0.05] * 19]
    s = summarise(rows)[0]
    assert s["random_draws"] == 20 and s["top_rank"] == 1 / 20  # one random set hurt as much
    assert s["top"] == -0.25 and s["top_p_value"] == 0.001 and s["correct_rate"] == 0.75
