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
    head_importance,
    shap_values,
)

CFG = ClassifierConfig(iterations=150, depth=4, folds=5, thread_count=2)


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
    assert res["mean"] > 0.85 and res["baseline_mean"] <= 0.55, res
    assert 0 < res["ci95"] < 0.1
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
