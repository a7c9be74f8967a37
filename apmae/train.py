"""The AP-MAE training engine (cf. MAE's engine_pretrain.py): optimiser, schedule, one step.

AdamW with betas (0.9, 0.95) and weight decay 0.05 (not on biases, norms, tokens and position
embeddings, as in MAE); learning rate = 1.5e-4 x global batch / 50 (the paper's linear
scaling from ViT-MAE's base rate), optional linear warm-up, cosine decay to 0 at ``total_steps``.
A non-finite loss stops training with a clear message instead of corrupting the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from apmae.mae import APMAE

BASE_LR = 1.5e-4
BASE_BATCH = 50


class NonFiniteLoss(RuntimeError):
    pass


@dataclass(frozen=True)
class Schedule:
    lr: float
    total_steps: int
    warmup_steps: int = 0

    def at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(global_batch: int, base_lr: float = BASE_LR) -> float:
    """1.5e-4 x global_batch / 50 (paper: batch 480 -> 1.44e-3)."""
    return base_lr * global_batch / BASE_BATCH


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.05) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(("token", "pos_embed")) else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def train_step(model: APMAE | torch.nn.Module, optimizer: torch.optim.Optimizer, patterns: torch.Tensor, lr: float,
               generator: torch.Generator | None = None) -> float:
    """One optimisation step on a batch of raw patterns, (N, S, S) or packed (N, S (S + 1) / 2)
    (:meth:`apmae.mae.APMAE.patches`); returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, _, _ = model(patterns, generator=generator)
    value = loss.item()
    if not math.isfinite(value):
        raise NonFiniteLoss(f"loss is {value}; stopping training (check the input patterns and the "
                            f"learning rate {lr:.3g}); the last checkpoint is intact")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return value


def shuffle_block(items: list, seed: int, block: int) -> list:
    """The training shuffle: one block of read patterns in a seeded random order.

    Patterns arrive grouped by head (the bus partitions them by model/layer/head), so batches
    taken in arrival order hold a handful of heads each and the gradient sees one head at a
    time. The trainer reads blocks of up to ``shuffle_window`` patterns across its partitions,
    adds the previous block's leftovers, and draws batches from this order. Seeded by
    (seed, block number), so a run is repeatable.
    """
    import random

    out = list(items)
    random.Random(f"{seed}:{block}").shuffle(out)
    return out
