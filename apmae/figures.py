"""The paper's figures as PNG files (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 90) -> Path:
    """tight_layout, create the folder, write the PNG (cropped to everything drawn, so rotated
    tick labels and legends are never clipped), free the figure."""
    plt = _plt()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return path


def layer_head_heatmap(values: dict[tuple[int, int], float], n_layers: int, n_heads: int, title: str,
                       path: Path | None, cbar: str = "", counts: bool = False, only_given_layers: bool = False):
    """Figure 3 (clusters per head) and Figures 5-6 (SHAP difference per head): layer x head.

    ``counts``: integer values (clusters per head) get one colour per count on a discrete
    scale of at least two steps, and each cell is labelled; a map where every head has the
    same count (one cluster each) then reads as that count, not as a blank, degenerate scale.
    ``only_given_layers``: one row per layer present in ``values`` (labelled with its number),
    instead of every layer with the unmined ones blank."""
    plt = _plt()
    layers = sorted({layer for layer, _ in values}) if only_given_layers else list(range(n_layers))
    row = {layer: i for i, layer in enumerate(layers)}
    grid = np.full((len(layers), n_heads), np.nan)
    for (layer, head), v in values.items():
        grid[row[layer], head] = v
    values = {(row[layer], head): v for (layer, head), v in values.items()}
    fig, ax = plt.subplots(figsize=(max(4, n_heads * 0.45 + 2), max(2.2, len(layers) * 0.22 + 1.5)))
    finite = grid[np.isfinite(grid)]
    if counts and finite.size:
        from matplotlib.colors import BoundaryNorm

        lo, hi = int(finite.min()), int(finite.max())
        lo, hi = min(lo, hi - 1), max(hi, lo + 1)  # never a single-value scale
        bounds = np.arange(lo - 0.5, hi + 1.5)
        cmap = plt.get_cmap("viridis", len(bounds) - 1)
        im = ax.imshow(grid, aspect="auto", cmap=cmap, norm=BoundaryNorm(bounds, cmap.N), origin="lower")
        cb = fig.colorbar(im, ax=ax, label=cbar, ticks=np.arange(lo, hi + 1))
        cb.ax.tick_params(labelsize=8)
        if grid.size <= 1200:
            for (layer, head), v in values.items():
                ax.text(head, layer, f"{int(v)}", ha="center", va="center", fontsize=6,
                        color="white" if v <= (lo + hi) / 2 else "black")
    else:
        vmin = vmax = None
        if finite.size and finite.min() == finite.max():  # one value everywhere: centre it on the scale
            vmin, vmax = finite.min() - 0.5, finite.max() + 0.5
        im = ax.imshow(grid, aspect="auto", cmap="magma", origin="lower", vmin=vmin, vmax=vmax)
        fig.colorbar(im, ax=ax, label=cbar)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    if only_given_layers:
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_title(title)
    if path is None:  # the figure itself (tests inspect its scale)
        return fig
    return save_figure(fig, path, dpi=90)


def calibration_plot(prob: np.ndarray, actual: np.ndarray, path: Path, title: str = "", bins: int = 10) -> dict:
    """Reliability diagram: per bin of predicted P(correct), the observed correct rate with its
    95% Wilson interval and n; the diagonal is perfect calibration. Returns the bins and the
    Brier score (with n)."""
    from apmae.stats import wilson_interval

    plt = _plt()
    prob, actual = np.asarray(prob, dtype=float), np.asarray(actual, dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(prob, edges[1:-1]), 0, bins - 1)
    rows = []
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        if not n:
            continue
        k = int(actual[sel].sum())
        lo, hi = wilson_interval(k, n)
        rows.append({"bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}", "n": n, "mean_prob": float(prob[sel].mean()),
                     "observed": k / n, "ci95": [lo, hi]})
    brier = float(np.mean((prob - actual) ** 2)) if len(prob) else None
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(5.2, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    if rows:
        x = [r["mean_prob"] for r in rows]
        y = [r["observed"] for r in rows]
        ax.errorbar(x, y, yerr=interval_error_bars(y, [r["ci95"] for r in rows]), marker="o", capsize=3,
                    label="observed correct rate (95% Wilson CI)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed correct rate")
    brier_txt = "n/a" if brier is None else f"{brier:.3f}"
    ax.set_title(f"{title}\nBrier score {brier_txt} (n = {len(prob)})", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    axn.bar((edges[:-1] + edges[1:]) / 2, np.bincount(idx, minlength=bins) if len(prob) else np.zeros(bins),
            width=0.9 / bins, color="tab:blue")
    axn.set_xlabel("predicted P(correct)")
    axn.set_ylabel("n")
    save_figure(fig, path, dpi=90)
    return {"bins": rows, "brier": brier, "n": int(len(prob))}


def cluster_scatter(points: np.ndarray, labels: np.ndarray, path: Path, title: str) -> Path:
    """UMAP scatter: a head's points in 2-D, one colour per HDBSCAN cluster, noise in grey."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for c in sorted(set(labels.tolist())):
        sel = labels == c
        if c == -1:
            ax.scatter(points[sel, 0], points[sel, 1], s=6, c="lightgrey", label=f"noise (n={int(sel.sum())})")
        else:
            ax.scatter(points[sel, 0], points[sel, 1], s=8, label=f"cluster {c} (n={int(sel.sum())})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save_figure(fig, path, dpi=90)


def cluster_examples(examples: dict[int, list[np.ndarray]], title: str, path: Path, per_cluster: int = 5) -> Path:
    """Figure 2: rows = clusters of one head, columns = example (log-scaled) patterns."""
    plt = _plt()
    clusters = sorted(examples)
    fig, axes = plt.subplots(len(clusters), per_cluster, figsize=(per_cluster * 1.8, len(clusters) * 1.9),
                             squeeze=False)
    for r, c in enumerate(clusters):
        for k in range(per_cluster):
            ax = axes[r][k]
            ax.set_xticks([])
            ax.set_yticks([])
            if k < len(examples[c]):
                ax.imshow(examples[c][k], cmap="viridis", vmin=0, vmax=1)
            if k == 0:
                ax.set_ylabel("noise" if c == -1 else f"cluster {c}")
    fig.suptitle(title)
    return save_figure(fig, path, dpi=80)


def interval_error_bars(values: list[float], cis: list[tuple[float, float]]) -> list[list[float]]:
    """Matplotlib's asymmetric ``yerr`` ([below], [above]) from intervals ``(low, high)`` that
    hold their values."""
    return [[v - lo for v, (lo, _) in zip(values, cis, strict=True)],
            [hi - v for v, (_, hi) in zip(values, cis, strict=True)]]


def task_bars(tasks: list[str], series: list[tuple[str, list[float], list[float] | None]], path: Path,
              title: str, ylabel: str = "", ylim: tuple[float, float] | None = None) -> Path:
    """Grouped bars: one group per task, one bar per (label, values, error bars or None)."""
    plt = _plt()
    x = np.arange(len(tasks))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, len(tasks) * 0.9), 4))
    for i, (label, values, err) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, yerr=err, capsize=3 if err else 0, label=label)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, tasks, rotation=30, ha="right")
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return save_figure(fig, path, dpi=90)


def accuracy_bars(rows: list[dict], path: Path, title: str = "") -> Path:
    """Figure 4: per task, the LLM's correct rate over all candidates and the classifier's CV
    accuracy, each with its 95% interval ``[low, high]``, next to the 0.5 chance level."""
    llm = [r["llm_correct"]["rate"] for r in rows]
    acc = [r["mean"] for r in rows]
    return task_bars([r["task"] for r in rows], [
        ("LLM correct rate (all candidates, 95% CI)", llm,
         interval_error_bars(llm, [r["llm_correct"]["ci95"] for r in rows])),
        ("classifier CV accuracy (95% CI)", acc, interval_error_bars(acc, [r["ci95"] for r in rows])),
        ("chance level (balanced data)", [r["chance_level"] for r in rows], None),
    ], path, title, ylim=(0, 1))


def intervention_bars(summary: list[dict], path: Path, title: str) -> Path:
    """Per task, the change in the LLM's correctness rate with k heads zeroed: top-SHAP heads,
    random heads (mean and std over draws) and neutral heads."""
    return task_bars([s["task"] for s in summary], [
        ("top-SHAP heads zeroed", [s["top"] for s in summary], None),
        ("random heads (mean, std)", [s["random_mean"] for s in summary], [s["random_std"] for s in summary]),
        ("neutral heads", [s["neutral"] for s in summary], None),
    ], path, title, ylabel="change in correctness rate")


def loss_curve(history: list[dict], path: Path, title: str = "AP-MAE training loss") -> Path:
    """The training loss by step (``history``: trainer_state.json's ``log_history``), log scale."""
    plt = _plt()
    steps = [h["step"] for h in history]
    loss = [h["loss"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(steps, loss, lw=1.2)
    if len(loss) > 20:  # a running mean beside the noisy per-batch loss
        k = max(5, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=2, label=f"mean of {k}")
        ax.legend()
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("masked-patch MSE (in sample)")
    ax.set_title(title)
    return save_figure(fig, path)
