"""Capturing the attention probabilities of chosen heads, without eager attention.

``output_attentions`` in transformers needs ``attn_implementation="eager"`` and materialises
every head of every layer. Instead we register an attention function with transformers'
``AttentionInterface`` that

1. computes the layer's output with the library's own SDPA function (fast path unchanged),
2. recomputes ``softmax(Q K^T * scale + causal mask)`` only for the selected heads, from the
   post-RoPE query/key the function receives (GQA-aware: query head h reads KV head
   ``h // (n_heads / n_kv_heads)``), in float32, and stores it.

The selection is per layer and per sample: ``select[layer]`` is an ``(B, k)`` long tensor of
head indices (all heads for mining, a fresh random 25% per layer for training).
"""

from __future__ import annotations

import time

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

IMPLEMENTATION = "apmae_capture"


class AttentionCapture:
    """Holds the current head selection and the captured probabilities, per layer."""

    def __init__(self) -> None:
        self.select: dict[int, torch.Tensor] = {}
        self.captured: dict[int, torch.Tensor] = {}
        self.enabled = True
        self.seconds = 0.0  # time spent recomputing probabilities (the capture's own cost)

    def clear(self) -> None:
        self.select.clear()
        self.captured.clear()

    def probabilities(self, module, query: torch.Tensor, key: torch.Tensor, attention_mask, scaling: float,
                      sel: torch.Tensor) -> torch.Tensor:
        """query: (B, H, T, D); key: (B, H_kv, T, D); sel: (B, k) -> (B, k, T, T) float32."""
        b, h, t, d = query.shape
        groups = h // key.shape[1]
        q = query.gather(1, sel[:, :, None, None].expand(b, sel.shape[1], t, d))  # (B, k, T, D)
        k = key.gather(1, (sel // groups)[:, :, None, None].expand(b, sel.shape[1], key.shape[2], d))
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling  # (B, k, T, S)
        s = scores.shape[-1]
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask[:, :, :, :s]
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask.float()
        else:  # plain causal: sequences are always full length here, never padded
            causal = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(s - t)
            scores = scores.masked_fill(~causal, float("-inf"))
        return torch.softmax(scores, dim=-1)


def capture_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: SDPA output + probabilities for the selected heads."""
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                    scaling=scaling, **kwargs)
    cap: AttentionCapture | None = getattr(module, "_apmae_capture", None)
    if cap is not None and cap.enabled:
        sel = cap.select.get(module.layer_idx)
        if sel is not None:
            t0 = time.perf_counter()
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            cap.captured[module.layer_idx] = cap.probabilities(module, query, key, attention_mask, scale, sel)
            cap.seconds += time.perf_counter() - t0
    return out, None


def attention_modules(model) -> list:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]


def install(model) -> AttentionCapture:
    """Switch ``model`` to the capturing attention and return its capture handle."""
    # registered here, when a model is switched to it, not as a side effect of importing this
    # module (transformers' registry is global: importing apmae must not change it)
    AttentionInterface.register(IMPLEMENTATION, capture_attention_forward)  # idempotent
    cap = AttentionCapture()
    for m in attention_modules(model):
        m._apmae_capture = cap
    model.set_attn_implementation(IMPLEMENTATION)
    return cap


def random_heads(n_heads: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """A fresh random subset of ``round(fraction * n_heads)`` (at least 1) head ids, sorted."""
    k = max(1, round(fraction * n_heads))
    return torch.randperm(n_heads, generator=generator)[:k].sort().values
