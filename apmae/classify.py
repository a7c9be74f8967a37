"""Predicting whether the target LLM was right from per-head cluster ids (paper section 6).

Each sample is one row: the cluster id of every head as a categorical feature (720 to 1920
columns for StarCoder2), noise (-1) a category of its own. One CatBoost classifier per task
and target model, on data balanced between correct and incorrect predictions; 10-fold
cross-validation (each fold's training part split 90/10 again for early stopping, the
paper's "90, 10, 10") with mean accuracy and a 95% t-interval, next to the majority-class
baseline. SHAP: CatBoost's own ``ShapValues`` (expected value in the LAST column; the
authors read the first and shifted every head by one), summarised per head as the largest
difference between the mean SHAP values of its categories.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class ClassifierConfig:
    iterations: int = 1000
    depth: int = 6
    learning_rate: float = 0.1
    early_stopping_rounds: int = 25
    one_hot_max_size: int = 2
    # CatBoost's default (4) builds CTRs of feature combinations; with 720+ categorical heads
    # that dominates the fit. 1 (single-head CTRs only) is ~5x faster at equal held-out
    # accuracy (benchmarks/classifier.py); the paper does not set it.
    max_ctr_complexity: int = 1
    folds: int = 10
    thread_count: int = -1
    seed: int = 0


def column(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def parse_column(name: str) -> tuple[int, int]:
    layer, head = name[1:].split("H")
    return int(layer), int(head)


def feature_frame(rows: dict[str, dict[str, int]], columns: list[str]) -> pd.DataFrame:
    """{sample_id: {column: cluster}} -> DataFrame (samples x heads) of string categories."""
    data = {c: [str(rows[s].get(c, "missing")) for s in rows] for c in columns}
    return pd.DataFrame(data, index=list(rows))


def balance(y: pd.Series, seed: int = 0) -> pd.Index:
    """Indices of a correct/incorrect-balanced subsample (the minority class kept whole)."""
    groups = [y[y == v].index for v in (True, False)]
    n = min(len(g) for g in groups)
    rng = np.random.default_rng(seed)
    keep = [g if len(g) == n else pd.Index(rng.choice(g, n, replace=False)) for g in groups]
    return keep[0].append(keep[1])


def _model(cfg: ClassifierConfig, cat_features: list[int]):
    from catboost import CatBoostClassifier

    return CatBoostClassifier(iterations=cfg.iterations, depth=cfg.depth, learning_rate=cfg.learning_rate,
                              one_hot_max_size=cfg.one_hot_max_size, max_ctr_complexity=cfg.max_ctr_complexity,
                              thread_count=cfg.thread_count,
                              random_seed=cfg.seed, cat_features=cat_features, verbose=False,
                              allow_writing_files=False)


def fit(x: pd.DataFrame, y: pd.Series, cfg: ClassifierConfig, eval_share: float = 0.1):
    """Fit one classifier, holding out ``eval_share`` for early stopping."""
    from sklearn.model_selection import train_test_split

    cats = list(range(x.shape[1]))
    model = _model(cfg, cats)
    if cfg.early_stopping_rounds and len(y) >= 20 and y.nunique() == 2:
        xt, xe, yt, ye = train_test_split(x, y, test_size=eval_share, stratify=y, random_state=cfg.seed)
        model.fit(xt, yt.astype(int), eval_set=(xe, ye.astype(int)), early_stopping_rounds=cfg.early_stopping_rounds)
    else:
        model.fit(x, y.astype(int))
    return model


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of a Student-t confidence interval."""
    from scipy import stats

    a = np.asarray(values, dtype=float)
    if len(a) < 2:
        return float(a.mean()), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a))
    return float(a.mean()), float(half)


def cross_validate(x: pd.DataFrame, y: pd.Series, cfg: ClassifierConfig) -> dict:
    """k-fold CV: accuracy per fold, mean and 95% CI, and the majority-class baseline."""
    from sklearn.model_selection import StratifiedKFold

    folds = min(cfg.folds, int(y.value_counts().min()))
    if folds < 2:
        raise ValueError(f"need at least 2 samples of each label for CV, have {dict(y.value_counts())}")
    acc, base = [], []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=cfg.seed).split(x, y):
        model = fit(x.iloc[train], y.iloc[train], cfg)
        pred = model.predict(x.iloc[test]).astype(int).ravel()
        acc.append(float((pred == y.iloc[test].astype(int).to_numpy()).mean()))
        majority = int(y.iloc[train].astype(int).mode()[0])
        base.append(float((y.iloc[test].astype(int).to_numpy() == majority).mean()))
    mean, ci = t_interval(acc)
    bmean, bci = t_interval(base)
    return {"folds": folds, "accuracy": acc, "mean": mean, "ci95": ci, "baseline_mean": bmean, "baseline_ci95": bci,
            "n": len(y)}


def shap_values(model, x: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(N, F) SHAP values and (N,) expected values, CatBoost's own computation.

    CatBoost returns (N, F + 1) with the expected value in the LAST column.
    """
    from catboost import Pool

    sv = model.get_feature_importance(Pool(x, cat_features=list(range(x.shape[1]))), type="ShapValues")
    return sv[:, :-1], sv[:, -1]


def head_importance(shap: np.ndarray, x: pd.DataFrame) -> pd.Series:
    """Per head: max over categories of the mean SHAP value minus the min over categories."""
    out = {}
    for j, col in enumerate(x.columns):
        means = pd.Series(shap[:, j]).groupby(x[col].to_numpy()).mean()
        out[col] = float(means.max() - means.min()) if len(means) > 1 else 0.0
    return pd.Series(out).sort_values(ascending=False)
