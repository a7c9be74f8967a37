"""Head intervention: zero chosen attention heads of the target model at inference.

The check of whether the heads the classifier names matter to the model (the authors'
notebook; the paper's later version reports it): a forward pre-hook on each attention
block's ``o_proj`` zeroes the input slice of the chosen heads, i.e. their contribution to
the residual stream, exactly as if their columns of ``o_proj.weight`` were zero.

Conditions compared on the same held-out inputs, per task:

* ``top``: the k heads with the largest SHAP spread for the task (:func:`apmae.classify.head_importance`);
* ``random``: k heads drawn uniformly (several draws), the control for "any k heads";
* ``neutral``: the k heads with the smallest SHAP spread, the control for "unimportant heads".
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from apmae.capture import attention_modules

Heads = dict[int, list[int]]  # layer -> head ids


@contextmanager
def zero_heads(model: torch.nn.Module, heads: Heads) -> Iterator[None]:
    """Within the block, the listed heads' outputs are zeroed before ``o_proj``."""
    blocks = {m.layer_idx: m for m in attention_modules(model)}
    handles = []
    try:
        for layer, hs in heads.items():
            if not hs:
                continue
            attn = blocks[layer]
            head_dim = attn.head_dim
            index = torch.tensor(sorted(set(hs)))

            def hook(module, args, index=index, head_dim=head_dim):
                x = args[0]  # (B, T, n_heads * head_dim)
                x = x.view(*x.shape[:-1], -1, head_dim).index_fill(-2, index.to(x.device), 0.0)
                return (x.flatten(-2), *args[1:])

            handles.append(attn.o_proj.register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def as_heads(pairs: list[tuple[int, int]]) -> Heads:
    out: Heads = {}
    for layer, head in pairs:
        out.setdefault(layer, []).append(head)
    return out


def choose(importance: dict[tuple[int, int], float], k: int, condition: str, seed: int = 0) -> list[tuple[int, int]]:
    """k (layer, head) pairs for ``condition`` in top / random / neutral.

    ``importance`` covers every head. Ties (many heads have spread 0) are broken at random
    with ``seed``, so ``neutral`` is not always the first layer's heads.
    """
    rng = random.Random(f"{condition}:{seed}")
    pairs = list(importance)
    rng.shuffle(pairs)  # random tie-break before the stable sort
    if condition == "top":
        return sorted(pairs, key=lambda p: -importance[p])[:k]
    if condition == "neutral":
        return sorted(pairs, key=lambda p: importance[p])[:k]
    if condition == "random":
        return pairs[:k]
    raise ValueError(f"unknown condition {condition!r} (top, random, neutral)")


def paired_effect(base: np.ndarray, got: np.ndarray) -> dict:
    """One condition against the unchanged model on the same inputs: its correct rate, the
    change, how many predictions flipped either way, and McNemar's exact p-value."""
    from apmae.stats import mcnemar

    base, got = np.asarray(base, dtype=bool), np.asarray(got, dtype=bool)
    m = mcnemar(base, got)
    return {"n": len(base), "correct_rate": float(got.mean()), "delta": float(got.mean() - base.mean()),
            "flipped": int((got != base).sum()), "lost": m["lost"], "gained": m["gained"],
            "p_value": m["p_value"]}


def summarise(rows: list[dict]) -> list[dict]:
    """One row per task: baseline correctness, the change per condition (random: mean and std
    over draws), McNemar's p of the top heads, and ``top_rank``: the share of random draws
    that hurt at least as much as the top heads (an empirical p-value of "top-SHAP heads
    matter more than any k heads"; meaningful with 20+ draws)."""
    out = []
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task and "correct_rate" in r]
        if not mine:
            continue
        by = defaultdict(list)
        for r in mine:
            by[r["condition"]].append(r)
        top = by["top"][0]
        rand = [r["delta"] for r in by["random"]]
        out.append({"task": task, "n": mine[0]["n"], "correct_rate": by["none"][0]["correct_rate"],
                    "top": top["delta"], "top_p_value": top.get("p_value"), "neutral": by["neutral"][0]["delta"],
                    "neutral_p_value": by["neutral"][0].get("p_value"),
                    "random_mean": float(np.mean(rand)) if rand else None,
                    "random_std": float(np.std(rand)) if rand else None, "random_draws": len(rand),
                    "top_rank": float(np.mean([d <= top["delta"] for d in rand])) if rand else None})
    return out
