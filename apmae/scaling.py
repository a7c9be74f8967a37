"""The paper's log scaling of attention patterns (section 4, "Architecture"; the ablation in
4.2 shows AP-MAE needs it), and its inverse.

The paper says only "we scale the attention patterns by taking the natural logarithm". The
form here maps each pattern into [0, 1]:

    s = (ln a - m) / (-m),   m = min over the pattern's positive entries of ln a

so the smallest positive probability becomes 0, a probability of 1 becomes 1, and exact
zeros (the upper triangle, underflow) stay 0. :func:`unlog` inverts it given ``m``, for
showing a reconstruction in probability space.
"""

from __future__ import annotations

import numpy as np
import torch


def log_scale(a: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The paper's log normalisation, per pattern.

    a: ``(..., n, n)`` probabilities (the minimum is over the last two dimensions, so an
    ``(N, 1, L)`` stack of packed triangles works too). Returns the same shape, float32, in [0, 1]:
    ``s = (ln a - m) / (-m)`` where ``m`` is the minimum of ``ln a`` over the positive
    entries of that pattern; entries with ``a == 0`` (upper triangle, underflow) become 0.
    """
    pos, la, m = _log_and_min(a)
    # in place on la (a fresh tensor): each step is a pass over the pattern, and this was the
    # larger part of an unmasked pass of the small variant
    return la.sub_(m).div_(m.neg()).clamp_(0.0, 1.0).masked_fill_(~pos, 0.0)


def pattern_log_min(a: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``m`` of :func:`log_scale` per pattern: ``(..., n, n)`` -> ``(..., 1, 1)``."""
    return _log_and_min(a)[2]


def _log_and_min(a: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a > 0, a fresh tensor with ln a where a > 0 (ln of the smallest normal float where
    a == 0; masked out by both callers), m per pattern)."""
    a = torch.as_tensor(a, dtype=torch.float32)
    pos = a > 0
    la = a.clamp_min(torch.finfo(torch.float32).tiny).log_()
    m = la.masked_fill(~pos, torch.finfo(torch.float32).max).amin(dim=(-2, -1), keepdim=True)
    m = torch.where(m >= 0, torch.full_like(m, -1.0), m)  # a pattern of exact ones: avoid 0/0
    return pos, la, m


def unlog(s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Probabilities from log-scaled values: ``a = exp(m (1 - s))`` where ``s > 0``, else 0.

    s: ``(..., n, n)`` in [0, 1]; m: ``(..., 1, 1)`` from :func:`pattern_log_min`. Values at
    s == 0 were zeros or the pattern's smallest probability: both are returned as 0."""
    return torch.where(s > 0, torch.exp(m * (1 - s)), torch.zeros_like(s))
