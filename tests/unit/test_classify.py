"""Correctness classification on synthetic rows where a few heads decide the label."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apmae.classify import (
    ClassifierConfig,
    balance,
    column,
    cross_validate,
    fit,
    fit_task,
    head_importance,
    model_correct_rate,
    shap_values,
)
from apmae.stats import wilson_interval

CFG = ClassifierConfig(iterations=150, depth=4, folds=5, threads=2)


def planted(n: int = 400, heads: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    cols = [column(h // 6, h % 6) for h in range(heads)]
    x = pd.DataFrame({c: rng.integers(-1, 4, n).astype(str) for c in cols})
    # the label is decided by heads L1H2 and L3H0 (cluster "2" in either -> correct), 5% flipped
    y = (x["L1H2"] == "2") | (x["L3H0"] == "2")
    y = y ^ (rng.random(n) < 0.05)
    return x, pd.Series(y, name="correct")


def test_cv_accuracy_far_above_baseline_and_shap_ranks_the_planted_heads():
    x, y = planted()
    idx = balance(y)
    xb, yb = x.loc[idx], y.loc[idx]
    assert yb.mean() == 0.5
    res = cross_validate(xb, yb, CFG)
    assert res["mean"] > 0.85 and res["chance_level"] == 0.5 and res["baseline"] == 0.5, res
    lo, hi = res["ci95"]
    assert lo < res["mean"] < hi and hi - lo < 0.15 and res["p_value"] < 1e-6
    model = fit(xb, yb, CFG)
    shap, expected = shap_values(model, xb)
    top = head_importance(shap, xb)
    assert set(top.index[:2]) == {"L1H2", "L3H0"}, top.head()


def test_shap_column_layout_expected_value_is_last():
    x, y = planted(200)
    model = fit(x, y, CFG)
    from catboost import Pool

    raw = model.get_feature_importance(Pool(x, cat_features=list(range(30))), type="ShapValues")
    assert raw.shape == (200, 31)
    shap, expected = shap_values(model, x)
    assert np.allclose(expected, raw[:, -1]) and np.allclose(expected, expected[0])  # constant: the base value
    margin = model.predict(x, prediction_type="RawFormulaVal")
    assert np.allclose(shap.sum(1) + expected, margin, atol=1e-6)  # SHAP sums to the margin


def test_cv_needs_both_labels():
    x, y = planted(20)
    with pytest.raises(ValueError, match="at least 2"):
        cross_validate(x, pd.Series([True] * 19 + [False]), CFG)


def test_baseline_on_balanced_data_is_chance_not_the_fold_majority():
    # 5 + 5 rows, 3 stratified folds: a test fold of 2 correct + 1 incorrect trains on 3 + 4, whose
    # majority (incorrect) scores 1/3 on it. The fold-majority "baseline" came out at 0.333.
    x, _ = planted(10)
    y = pd.Series([True, False] * 5)
    res = cross_validate(x, y, ClassifierConfig(iterations=20, depth=2, folds=3, threads=1))
    assert res["folds"] == 3 and res["n"] == 10
    assert res["chance_level"] == 0.5 and res["baseline"] == 0.5 and res["balanced"]


def test_ci_is_a_wilson_interval_over_pooled_out_of_fold_predictions():
    x, y = planted(120, seed=3)
    idx = balance(y)
    res = cross_validate(x.loc[idx], y.loc[idx], CFG)
    assert res["n"] == len(idx)  # every balanced row predicted exactly once
    assert res["mean"] == res["correct"] / res["n"]
    lo, hi = res["ci95"]
    assert (lo, hi) == wilson_interval(res["correct"], res["n"])
    assert 0 <= lo <= res["mean"] <= hi <= 1


def test_wilson_interval_stays_in_the_unit_interval():
    # a t-interval over the fold accuracies 1, 1, 1, 0.5 is 0.875 +- 0.40, i.e. up to 1.27
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    for k in range(0, 21):
        lo, hi = wilson_interval(k, 20)
        assert 0 <= lo <= k / 20 <= hi <= 1


def test_wilson_interval_holds_its_rate_at_every_n_despite_rounding():
    # k = 0 at n = 6 gave low = 5.6e-17 > 0 = p: a negative error bar that matplotlib refuses
    for n in range(1, 400):
        for k in (0, 1, n - 1, n):
            lo, hi = wilson_interval(k, n)
            assert 0 <= lo <= k / n <= hi <= 1, (k, n, lo, hi)


def test_model_correct_rate_is_over_every_candidate():
    # 30 of 100 candidates right: the balanced rows (30 + 30) would say 0.5
    rate = model_correct_rate([True] * 30 + [False] * 70 + [None] * 5)
    assert rate["rate"] == 0.3 and rate["n"] == 100
    assert rate["ci95"][0] < 0.3 < rate["ci95"][1]


def test_fit_task_balances_skips_and_names_the_rows_it_fit_on():
    x, y = planted(300, seed=4)
    rows = {f"s{i}": {c: int(v) for c, v in x.iloc[i].items()} for i in range(len(x))}
    labels = pd.Series({f"s{i}": bool(v) for i, v in enumerate(y)})
    tf = fit_task(labels, rows, list(x.columns), CFG, min_rows=20)
    minority = int(min(labels.sum(), (~labels).sum()))
    assert tf.result["n_balanced"] == 2 * minority == len(tf.train_ids)
    assert labels.loc[tf.train_ids].mean() == 0.5
    assert set(list(tf.importance.index[:2])) == {"L1H2", "L3H0"}
    few = fit_task(labels.iloc[:12], rows, list(x.columns), CFG, min_rows=20)
    assert few.model is None and "balanced rows < 20" in few.result["skipped"]
    one = fit_task(labels[labels], rows, list(x.columns), CFG)
    assert one.model is None and one.result["skipped"] == "one label only"


def test_a_task_whose_heads_never_vary_is_skipped_with_its_reason():
    """Every head one cluster (a short AP-MAE run): CatBoost raised "All features are either
    constant or ignored" and the study's classify stage crashed."""
    rows = {f"s{i}": {"L0H0": 3, "L0H1": -1} for i in range(40)}
    labels = pd.Series({f"s{i}": i % 2 == 0 for i in range(40)})
    tf = fit_task(labels, rows, ["L0H0", "L0H1"], CFG, min_rows=20)
    assert tf.model is None and "varies" in tf.result["skipped"] and tf.result["n_balanced"] == 40


def test_a_fold_whose_training_rows_never_vary_predicts_their_majority():
    """One row alone carries a second category: the fold that tests it trains on constant
    features (CatBoost raised there), and still predicts every one of its rows."""
    x = pd.DataFrame({"L0H0": ["0"] * 39 + ["1"]})
    y = pd.Series([i % 2 == 0 for i in range(40)])
    res = cross_validate(x, y, ClassifierConfig(iterations=10, depth=2, folds=4, threads=1))
    assert res["n"] == 40 and len(res["fold_accuracy"]) == 4


def test_cv_by_file_does_not_learn_a_file_from_its_other_samples():
    """The label is a property of the file and one head's cluster names the file: folds by
    sample score the classifier on files it has seen (high accuracy that would not carry to
    new code), folds by file do not."""
    rng = np.random.default_rng(5)
    files = [f"f{i}" for i in range(40) for _ in range(8)]
    file_label = {f"f{i}": bool(i % 2) for i in range(40)}
    x = pd.DataFrame({"L0H0": files, "L0H1": rng.integers(0, 3, len(files)).astype(str)})
    y = pd.Series([file_label[f] for f in files])
    cfg = ClassifierConfig(iterations=60, depth=3, folds=5, threads=2)
    by_sample = cross_validate(x, y, cfg)
    by_file = cross_validate(x, y, cfg, groups=pd.Series(files))
    assert by_sample["cv_split"] == "by sample" and by_file["cv_split"] == "by file"
    assert by_sample["mean"] > 0.9
    assert by_file["ci95"][0] < 0.5 < by_file["ci95"][1] or by_file["mean"] < 0.6


def test_holm_adjusts_a_family_of_p_values_step_down_and_monotone():
    from apmae.stats import holm

    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    # sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1, then made monotone
    assert adj == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.5})
    assert holm({"x": 0.6, "y": 0.6}) == {"x": 1.0, "y": 1.0}  # capped at 1
    assert holm({}) == {}
