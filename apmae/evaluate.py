"""Evaluating AP-MAE: reconstruction loss, a mean-patch baseline, cross-evaluation, Figure 1.

Every loss here uses fixed masks (a seeded generator), so two checkpoints, or a checkpoint
and the baseline, are scored on exactly the same masked patches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from apmae.mae import APMAE


def _batches(patterns: torch.Tensor, batch: int):
    for i in range(0, len(patterns), batch):
        yield i, patterns[i:i + batch]


@torch.no_grad()
def reconstruction_losses(model: APMAE, patterns: torch.Tensor, seed: int = 0, batch: int = 64) -> torch.Tensor:
    """patterns: (N, S, S) raw probabilities -> (N,) masked-patch MSE per pattern."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _, x in _batches(patterns, batch):
        target = model.patchify(model.preprocess(x))
        latent, mask, ids = model.forward_encoder(target, model.cfg.mask_ratio, g)
        pred = model.forward_decoder(latent, ids)
        valid = model.pixel_valid
        per_patch = ((pred - target) ** 2 * valid).sum(-1) / valid.sum(-1)
        out.append((per_patch * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


@torch.no_grad()
def mean_patch_losses(model: APMAE, train: torch.Tensor, patterns: torch.Tensor, seed: int = 0,
                      batch: int = 64) -> torch.Tensor:
    """The baseline: predict each masked patch as the mean (over ``train``) of that patch position."""
    mean = torch.cat([model.patchify(model.preprocess(x)) for _, x in _batches(train, batch)]).mean(0)  # (P, p*p)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _, x in _batches(patterns, batch):
        target = model.patchify(model.preprocess(x))
        _, mask, _ = model.random_masking(target, model.cfg.mask_ratio, g)
        valid = model.pixel_valid
        per_patch = ((mean - target) ** 2 * valid).sum(-1) / valid.sum(-1)
        out.append((per_patch * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def summary(losses: torch.Tensor) -> dict[str, float]:
    return {"mean": float(losses.mean()), "std": float(losses.std()) if len(losses) > 1 else 0.0, "n": len(losses)}


def cross_evaluation(models: dict[str, APMAE], sources: dict[str, torch.Tensor], seed: int = 0) -> dict:
    """Paper Table 2: rows = checkpoints (trained on), columns = pattern sources (evaluated on)."""
    return {m: {s: summary(reconstruction_losses(model, pats, seed)) for s, pats in sources.items()}
            for m, model in models.items()}


def format_table(matrix: dict, scale: float = 1e3) -> str:
    cols = sorted({c for row in matrix.values() for c in row})
    head = "trained \\ evaluated".ljust(24) + "".join(f"{c[:22]:>24}" for c in cols)
    lines = [head, "-" * len(head)]
    for r, row in matrix.items():
        cells = "".join(f"{row[c]['mean'] * scale:>13.2f} +- {row[c]['std'] * scale:<7.2f}" if c in row else " " * 24
                        for c in cols)
        lines.append(f"{r[:23]:<24}{cells}")
    lines.append(f"(loss x 1e{int(np.log10(1 / scale))})" if scale != 1 else "")
    return "\n".join(lines)


@torch.no_grad()
def figure1(model: APMAE, pattern: torch.Tensor, path: Path, seed: int = 0, title: str = "") -> Path:
    """Paper Figure 1 for one pattern (S, S): pattern, masked input, reconstruction, combined."""
    from apmae.figures import _plt, save_figure

    plt = _plt()
    model.eval()
    x = pattern[None]
    target = model.patchify(model.preprocess(x))
    g = torch.Generator().manual_seed(seed)
    latent, mask, ids = model.forward_encoder(target, model.cfg.mask_ratio, g)
    pred = model.forward_decoder(latent, ids)
    m = mask[0, :, None]
    panels = {
        "pattern": model.unpatchify(target)[0],
        "masked": model.unpatchify(target * (1 - m))[0],
        "reconstruction": model.unpatchify(pred * m)[0],
        "combined": model.unpatchify(target * (1 - m) + pred * m)[0],
    }
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.8))
    for ax, (name, img) in zip(axes, panels.items(), strict=True):
        ax.imshow(img.clamp(0, 1).numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    scaled = "log-scaled" if model.cfg.log_scale else "raw (no log scaling)"
    fig.suptitle(title or f"AP-MAE reconstruction ({scaled}, mask ratio {model.cfg.mask_ratio})")
    return save_figure(fig, path)
