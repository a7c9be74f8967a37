"""Evaluating AP-MAE: reconstruction loss, a mean-patch baseline, cross-evaluation, Figure 1.

Every loss here uses fixed masks (a seeded generator), so two checkpoints, or a checkpoint
and the baseline, are scored on exactly the same masked patches.

The unit of an evaluation is the sample, not the pattern: the heads of one sample share its
input and are not independent, so ``n`` counts samples, an evaluation's size limit picks
samples (:class:`SampleSelection`), and the interval of a mean loss resamples samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from apmae.mae import APMAE, masked_patch_loss


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
        target = model.patches(x)
        latent, mask, ids = model.forward_encoder(target, model.cfg.mask_ratio, g)
        out.append(masked_patch_loss(target, model.forward_decoder(latent, ids), mask, model.pixel_valid))
    return torch.cat(out)


@torch.no_grad()
def mean_patch_losses(model: APMAE, train: torch.Tensor, patterns: torch.Tensor, seed: int = 0,
                      batch: int = 64) -> torch.Tensor:
    """The baseline: predict each masked patch as the mean (over ``train``) of that patch position."""
    mean = torch.cat([model.patches(x) for _, x in _batches(train, batch)]).mean(0)  # (P, p*p)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _, x in _batches(patterns, batch):
        target = model.patches(x)
        _, mask, _ = model.random_masking(target, model.cfg.mask_ratio, g)
        out.append(masked_patch_loss(target, mean.expand_as(target), mask, model.pixel_valid))
    return torch.cat(out)


class SampleSelection:
    """Which patterns an evaluation uses, bounded whatever order they arrive in.

    Per target model, the ``limit`` samples with the smallest hash of their id (0 = every
    sample), and per sample the ``per_sample`` patterns with the smallest hash of their id
    (0 = every head): an unbiased draw of samples and of heads, not "the first N patterns"
    (which were every head of a handful of samples). Memory is bounded by the selection.
    """

    def __init__(self, limit: int = 0, per_sample: int = 0, seed: int = 0):
        self.limit, self.per_sample, self.seed = limit, per_sample, seed
        self.chosen: dict[str, dict[str, list]] = {}  # model -> sample -> [(hash, pattern id, item)]
        self.sample_hash: dict[str, float] = {}

    def _h(self, *parts: object) -> float:
        from apmae.split import unit

        return unit("eval", self.seed, *parts)

    def wants(self, model: str, sample_id: str, pattern_id: str) -> bool:
        """Would :meth:`offer` keep this pattern now? (decode only the ones it would)"""
        chosen = self.chosen.get(model, {})
        if sample_id not in chosen:
            if self.limit and len(chosen) >= self.limit and self._h(sample_id) >= max(
                    self.sample_hash[s] for s in chosen):
                return False
            return True
        pats = chosen[sample_id]
        return not self.per_sample or len(pats) < self.per_sample or self._h(pattern_id) < max(p[0] for p in pats)

    def offer(self, model: str, sample_id: str, pattern_id: str, item) -> None:
        if not self.wants(model, sample_id, pattern_id):
            return
        chosen = self.chosen.setdefault(model, {})
        if sample_id not in chosen:
            if self.limit and len(chosen) >= self.limit:  # evict the sample with the largest hash
                worst = max(chosen, key=self.sample_hash.__getitem__)
                del chosen[worst]
            chosen[sample_id] = []
            self.sample_hash[sample_id] = self._h(sample_id)
        pats = chosen[sample_id]
        if self.per_sample and len(pats) >= self.per_sample:
            pats.remove(max(pats, key=lambda p: p[0]))
        pats.append((self._h(pattern_id), pattern_id, item))

    def result(self) -> dict[str, tuple[list, list[str]]]:
        """model -> (items, the sample id of each item), in a stable order."""
        out = {}
        for model, chosen in self.chosen.items():
            items, ids = [], []
            for sid in sorted(chosen, key=self.sample_hash.__getitem__):
                for _, _, item in sorted(chosen[sid], key=lambda p: p[:2]):
                    items.append(item)
                    ids.append(sid)
            if items:
                out[model] = (items, ids)
        return out


def summary(losses: torch.Tensor, sample_ids: list[str] | None = None, seed: int = 0,
            resamples: int = 1000) -> dict:
    """Mean and std of per-pattern losses; with ``sample_ids``: ``n`` in samples, and a 95%
    interval of the mean from resampling samples (all of a sample's patterns together)."""
    out = {"mean": float(losses.mean()), "std": float(losses.std()) if len(losses) > 1 else 0.0,
           "n": len(losses), "n_patterns": len(losses)}
    if sample_ids is None:
        return out
    groups: dict[str, list[float]] = {}
    for sid, v in zip(sample_ids, losses.tolist(), strict=True):
        groups.setdefault(sid, []).append(v)
    sums = np.array([sum(g) for g in groups.values()])
    counts = np.array([len(g) for g in groups.values()])
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(sums), size=(resamples, len(sums)))
    means = sums[pick].sum(1) / counts[pick].sum(1)
    out.update({"n": len(groups), "n_samples": len(groups),
                "ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
                "ci_method": "bootstrap over samples"})
    return out


def split_samples(sample_ids: list[str], share: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(indices of the patterns of a ``share`` of the samples, the rest's), by a hash of the
    sample id: every head of a sample lands on the same side."""
    from apmae.split import unit

    side = [unit("baseline-fit", seed, s) < share for s in sample_ids]
    return [i for i, b in enumerate(side) if b], [i for i, b in enumerate(side) if not b]


def cross_evaluation(models: dict[str, APMAE], sources: dict[str, torch.Tensor], seed: int = 0,
                     samples: dict[str, list[str]] | None = None, baseline_share: float = 0.5) -> dict:
    """Paper Table 2: rows = checkpoints (trained on), columns = pattern sources (evaluated on).

    ``samples``: per source, the sample id of each pattern; then ``n`` counts samples and
    each cell also holds the mean-patch baseline (the mean patch of ``baseline_share`` of the
    samples, scored with the cell's own preprocessing on the other samples, the same masks)
    and AP-MAE's ``ratio`` to it; AP-MAE is then scored on those other samples too."""
    samples = samples or {}
    out: dict = {}
    for m, model in models.items():
        row = out.setdefault(m, {})
        for s, pats in sources.items():
            ids = samples.get(s)
            if ids is None:
                row[s] = summary(reconstruction_losses(model, pats, seed))
                continue
            fit_idx, ev_idx = split_samples(ids, baseline_share, seed)
            if not fit_idx or not ev_idx:  # too few samples to hold some out for the baseline
                row[s] = summary(reconstruction_losses(model, pats, seed), ids, seed)
                continue
            ev, ev_ids = pats[ev_idx], [ids[i] for i in ev_idx]
            losses = reconstruction_losses(model, ev, seed)
            base = mean_patch_losses(model, pats[fit_idx], ev, seed)
            row[s] = {**summary(losses, ev_ids, seed), "baseline": summary(base, ev_ids, seed),
                      "ratio": float(losses.mean() / base.mean()),
                      "baseline_fit_samples": len({ids[i] for i in fit_idx})}
    return out


def format_table(matrix: dict, scale: float = 1e3) -> str:
    cols = sorted({c for row in matrix.values() for c in row})
    head = "trained \\ evaluated".ljust(24) + "".join(f"{c[:22]:>24}" for c in cols)
    lines = [head, "-" * len(head)]
    for r, row in matrix.items():
        cells = "".join(f"{row[c]['mean'] * scale:>13.2f} +- {row[c]['std'] * scale:<7.2f}" if c in row else " " * 24
                        for c in cols)
        lines.append(f"{r[:23]:<24}{cells}")
        if any("ratio" in row[c] for c in cols if c in row):
            lines.append("  mean-patch baseline".ljust(24) + "".join(
                f"{row[c]['baseline']['mean'] * scale:>13.2f} (x{row[c]['ratio']:.2f})".ljust(24)
                if c in row and "ratio" in row[c] else " " * 24 for c in cols))
    first = next(iter(matrix.values()), {})
    lines.append("n".ljust(24) + "".join(
        f"{(str(first[c]['n']) + (' samples' if 'n_samples' in first[c] else ' patterns')):>24}" if c in first
        else " " * 24 for c in cols))
    lines.append(f"(loss x 1e{int(np.log10(1 / scale))})" if scale != 1 else "")
    return "\n".join(lines)


@torch.no_grad()
def figure1(model: APMAE, pattern: torch.Tensor, path: Path, seed: int = 0, title: str = "") -> Path:
    """Paper Figure 1 for one pattern (S, S): pattern, masked input, reconstruction, combined."""
    from apmae.figures import _plt, save_figure

    plt = _plt()
    model.eval()
    x = pattern[None]
    target = model.patches(x)
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


def paired_reconstruction(model, pats, ids: list[str], share: float = 0.5, seed: int = 0,
                          resamples: int = 1000) -> dict:
    """AP-MAE vs the mean-patch baseline on the same held-out samples and masks.

    The baseline's mean patch comes from ``share`` of the samples (by sample hash); both are
    scored on the other samples. The ratio's 95% CI resamples samples (a sample's heads
    together), as do the CIs of the two means."""
    fit_idx, ev_idx = split_samples(ids, share, seed)
    if not fit_idx or not ev_idx:
        return {"skipped": f"{len(set(ids))} samples: too few to split for the baseline"}
    ev, ev_ids = pats[ev_idx], [ids[i] for i in ev_idx]
    losses = reconstruction_losses(model, ev, seed)
    base = mean_patch_losses(model, pats[fit_idx], ev, seed)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(ev_ids):
        groups.setdefault(s, []).append(i)
    la, lb = losses.numpy(), base.numpy()
    sa = np.array([la[g].sum() for g in groups.values()])
    sb = np.array([lb[g].sum() for g in groups.values()])
    pick = np.random.default_rng(seed).integers(0, len(sa), size=(resamples, len(sa)))
    ratios = sa[pick].sum(1) / sb[pick].sum(1)
    diff_means = np.array([(la[g] - lb[g]).mean() for g in groups.values()])
    diffs = diff_means[pick].mean(1)
    return {"apmae": summary(losses, ev_ids, seed), "mean_patch_baseline": summary(base, ev_ids, seed),
            "ratio": float(la.mean() / lb.mean()),
            "ratio_ci95": [float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))],
            "apmae_minus_baseline_ci95": [float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))],
            "n_samples": len(groups), "n_patterns": len(ev_ids),
            "baseline_fit_samples": len({ids[i] for i in fit_idx}), "split": "by_sample",
            "ci_method": "bootstrap over samples (95%)"}
