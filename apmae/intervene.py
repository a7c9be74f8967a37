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
from collections.abc import Iterator
from contextlib import contextmanager

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
