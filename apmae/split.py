"""Which samples train AP-MAE, which are mined, and which heads each needs (paper 4 and 5.1).

The paper trains AP-MAE on the patterns of *correct* random-task predictions (a fresh random
25% of the heads of every layer per sample) and mines every task's patterns with all heads.
A sample that trained AP-MAE must never be mined, clustered, classified or used to evaluate
AP-MAE: its patterns are in the model, so they would leak into every downstream number
(before this rule, a correct random-task sample did both). The split is by sample, decided
from ids alone (deterministic on retries and across replicas, before the model runs):

* a file may be *held out* (a ``held_out_files`` share of files, by file id): none of its
  samples trains AP-MAE, so evaluations can be held out by file, not just by sample;
* otherwise a random-task sample trains AP-MAE when its id falls in the ``train_share``
  (it is used only if the model's prediction was correct; an incorrect one is used for
  nothing, so the mined random-task samples stay an unbiased draw);
* every other sample is a mining sample (subject to the per-task balance).

Patterns are never split on their own: all heads of a sample go the same way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from apmae.config import setting

if TYPE_CHECKING:  # torch is imported where heads are drawn: configs built from Split stay light
    import torch


@dataclass(frozen=True)
class Split:
    train_share: float = setting(0.75, "Share of random-task samples (of files not held out) that train AP-MAE "
                                       "(never mined)")
    held_out_files: float = setting(0.0, "Share of files (by id) none of whose samples train AP-MAE")
    train_fraction: float = setting(0.25, "Share of heads per layer kept for a training sample (the paper's 25%)")
    split_seed: int = setting(0, "Seed of the split (ids are hashed with it)")

    def __post_init__(self) -> None:
        for name in ("train_share", "held_out_files", "train_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} = {getattr(self, name)} is not a share in [0, 1]")


@dataclass(frozen=True)
class Route:
    """Where one sample's patterns go."""

    train: bool  # its patterns (25% of heads per layer) train AP-MAE
    mine: bool  # it may be mined (all heads), if the per-task balance admits it


def unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from ids (sha256, not Python's salted hash)."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def is_held_out_file(file_id: str, split: Split) -> bool:
    """True for the files whose samples never train AP-MAE."""
    return unit("held-out-file", split.split_seed, file_id) < split.held_out_files


def trains_apmae(task: str, sample_id: str, file_id: str, split: Split) -> bool:
    """Is this sample in AP-MAE's training split (decided before its prediction is known)?"""
    return (task == "random" and not is_held_out_file(file_id, split)
            and unit("train-sample", split.split_seed, sample_id) < split.train_share)


def route(task: str, correct: bool | None, sample_id: str, file_id: str, split: Split) -> Route:
    """The rule: a training-split sample trains AP-MAE when correct and is never mined."""
    t = trains_apmae(task, sample_id, file_id, split)
    return Route(train=t and correct is True, mine=not t)


def training_heads(n_heads: int, split: Split, generator: torch.Generator) -> torch.Tensor:
    """The paper's 25% rule: a fresh random ``train_fraction`` of the heads (at least one), for
    one layer of one sample; sorted head ids."""
    from apmae.capture import random_heads

    return random_heads(n_heads, split.train_fraction, generator)


def heads_to_capture(may_train: list[bool], may_mine: list[bool], n_layers: int, n_heads: int, split: Split,
                     generator: torch.Generator) -> dict[int, torch.Tensor]:
    """layer -> (B, k) head ids to capture for a batch, before the model runs.

    ``may_mine[i]``: sample i is a mining sample whose task still needs samples;
    ``may_train[i]``: sample i is in AP-MAE's training split. All heads of every layer if any
    sample may be mined (training samples then take their 25% from it); else a fresh 25% per
    layer and sample if any may train; else nothing.
    """
    import torch

    b = len(may_mine)
    if any(may_mine):
        return {layer: torch.arange(n_heads).expand(b, -1) for layer in range(n_layers)}
    if any(may_train):
        return {layer: torch.stack([training_heads(n_heads, split, generator) for _ in range(b)])
                for layer in range(n_layers)}
    return {}
