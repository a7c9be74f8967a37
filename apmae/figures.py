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
    """tight_layout, create the folder, write the PNG, free the figure."""
    plt = _plt()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def layer_head_heatmap(values: dict[tuple[int, int], float], n_layers: int, n_heads: int, title: str, path: Path,
                       cbar: str = "") -> Path:
    """Figure 3 (clusters per head) and Figures 5-6 (SHAP difference per head): layer x head."""
    plt = _plt()
    grid = np.full((n_layers, n_heads), np.nan)
    for (layer, head), v in values.items():
        grid[layer, head] = v
    fig, ax = plt.subplots(figsize=(max(4, n_heads * 0.45 + 2), max(3, n_layers * 0.22 + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="magma", origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=cbar)
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
    def err(values, cis):  # asymmetric error bars from intervals
        return [[v - lo for v, (lo, _) in zip(values, cis, strict=True)],
                [hi - v for v, (_, hi) in zip(values, cis, strict=True)]]

    llm = [r["llm_correct"]["rate"] for r in rows]
    acc = [r["mean"] for r in rows]
    return task_bars([r["task"] for r in rows], [
        ("LLM correct rate (all candidates, 95% CI)", llm, err(llm, [r["llm_correct"]["ci95"] for r in rows])),
        ("classifier CV accuracy (95% CI)", acc, err(acc, [r["ci95"] for r in rows])),
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
