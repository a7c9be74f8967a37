"""The AP-MAE training recipe (paper 4.1): which model, on what patterns, for how long, how fast.

One config, one source for every default. The trainer service holds it unprefixed (``apmae
train --steps 2000``); the demo and the study hold it as ``train`` (``--train-steps``). It
imports no torch, so building a command line from it stays fast (``apmae --help``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from apmae.config import setting

if TYPE_CHECKING:
    from apmae.mae import APMAEConfig
    from apmae.train import Schedule


@dataclass(frozen=True)
class TrainingConfig:
    variant: str = setting("small", "AP-MAE size: paper, base, small, tiny")
    pattern_size: int = setting(256, "Pattern size (the paper's 256; any multiple of the patch size)")
    patch_size: int = setting(32, "Patch size")
    mask_ratio: float = setting(0.5, "Share of patches masked")
    log_scale: bool = setting(True, "Log-normalise patterns (off = the paper's ablation)")
    batch_size: int = setting(64, "Patterns per step per process")
    shuffle_window: int = setting(2048, "Patterns read and shuffled together before batches are drawn "
                                        "(partitions are keyed by head: no shuffle means one head per batch)")
    steps: int = setting(1000, "Steps to train (the cosine schedule spans these)")
    epochs: int = setting(1, "Passes over the topic: 1 = a live stream (wait for new patterns at its end); "
                             "N > 1 = a fixed training set, read again from the beginning up to N times")
    warmup_steps: int = setting(0, "Linear warm-up steps")
    lr: float = setting(0.0, "Peak learning rate (0: 1.5e-4 x global batch / 50)")
    weight_decay: float = setting(0.05, "AdamW weight decay")
    seed: int = setting(0, "Seed for initialisation and masking")

    def model_config(self) -> APMAEConfig:
        """The AP-MAE architecture: the named variant at this recipe's sizes."""
        from apmae.mae import variant

        return variant(self.variant, pattern_size=self.pattern_size, patch_size=self.patch_size,
                       mask_ratio=self.mask_ratio, log_scale=self.log_scale)

    def schedule(self, world_size: int = 1) -> Schedule:
        """Warm-up and cosine decay; the peak rate scales with the global batch unless set."""
        from apmae.train import Schedule, scaled_lr

        return Schedule(self.lr or scaled_lr(self.batch_size * world_size), self.steps, self.warmup_steps)
