"""Report figures: Figure 3's scale with one cluster per head, Figure 4's labels, calibration."""

from __future__ import annotations

import numpy as np
from PIL import Image

from apmae import figures


def test_figure3_scale_is_not_degenerate_when_every_head_has_one_cluster():
    values = {(layer, head): 1 for layer in range(4) for head in range(6)}
    fig = figures.layer_head_heatmap(values, 4, 6, "clusters per head", None, "clusters", counts=True)
    image = fig.axes[0].images[0]
    assert image.norm.vmin < 1 < image.norm.vmax  # the single value sits inside a real range
    ticks = [t for t in fig.axes[1].get_yticks() if image.norm.vmin <= t <= image.norm.vmax]
    assert len(ticks) >= 2 and 1 in ticks
    labels = {t.get_text() for t in fig.axes[0].texts}
    assert labels == {"1"}  # every cell says its count
    rgba = image.to_rgba(np.array([[0.0, 1.0]]))[0]
    assert not np.allclose(rgba[0], rgba[1])  # 0 and 1 clusters get different colours


def test_figure4_long_task_labels_are_not_clipped(tmp_path):
    rows = [{"task": f"a_very_long_task_name_number_{i}", "mean": 0.6, "ci95": [0.5, 0.7], "chance_level": 0.5,
             "llm_correct": {"rate": 0.4, "ci95": [0.3, 0.5]}} for i in range(5)]
    path = figures.accuracy_bars(rows, tmp_path / "acc.png", "Figure 4")
    width, height = Image.open(path).size
    # the nominal canvas is 6.0 x 4.0 in at 90 dpi; rotated labels reach below it and are kept
    assert height > 4.0 * 90


def test_calibration_plot_bins_with_n_and_wilson_intervals(tmp_path):
    rng = np.random.default_rng(0)
    prob = rng.random(400)
    actual = (rng.random(400) < prob).astype(float)  # calibrated by construction
    cal = figures.calibration_plot(prob, actual, tmp_path / "cal.png", "test")
    assert (tmp_path / "cal.png").read_bytes()[:4] == b"\x89PNG"
    assert cal["n"] == 400 and sum(b["n"] for b in cal["bins"]) == 400
    assert abs(cal["brier"] - float(np.mean((prob - actual) ** 2))) < 1e-12
    for b in cal["bins"]:
        lo, hi = b["ci95"]
        assert 0 <= lo <= b["observed"] <= hi <= 1
        assert lo - 0.05 <= b["mean_prob"] <= hi + 0.05  # calibrated data stays near the diagonal


def test_figure3_draws_only_the_mined_layers_when_asked():
    values = {(0, h): 2 for h in range(4)} | {(29, h): 3 for h in range(4)}
    fig = figures.layer_head_heatmap(values, 30, 4, "clusters", None, "clusters", counts=True, only_given_layers=True)
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (2, 4)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "29"]


def test_the_loss_curve_is_drawn_from_the_trainers_log_history(tmp_path):
    from apmae.figures import loss_curve

    history = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 61)]
    path = loss_curve(history, tmp_path / "loss.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5000


def test_calibration_plot_draws_a_bin_where_every_prediction_was_wrong(tmp_path):
    # The demo's CI run failed here: a bin of 6 all-wrong rows had a Wilson low of 5.6e-17 > 0,
    # so its lower error bar was negative and matplotlib refused to draw it.
    prob = np.array([0.62, 0.63, 0.64, 0.65, 0.66, 0.67, 0.25, 0.26])
    actual = np.array([0, 0, 0, 0, 0, 0, 1, 0], dtype=float)
    cal = figures.calibration_plot(prob, actual, tmp_path / "cal.png", "test")
    zero = next(b for b in cal["bins"] if b["n"] == 6)
    assert zero["observed"] == 0 and zero["ci95"][0] == 0
