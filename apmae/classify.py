"""Predicting whether the target LLM was right from per-head cluster ids (paper section 6).

Each sample is one row: the cluster id of every head as a categorical feature (720 to 1920
columns for StarCoder2), noise (-1) a category of its own. One CatBoost classifier per task
and target model, on data balanced between correct and incorrect predictions; 10-fold
cross-validation (each fold's training part split 90/10 again for early stopping, the
paper's "90, 10, 10"). Accuracy is over the pooled out-of-fold predictions (every balanced
sample predicted once, by the fold model that did not see it) with a 95% Wilson interval,
next to the 0.5 chance level of balanced data. (The fold-majority baseline is wrong on
balanced data: stratified folds make the training part's majority the test part's
minority, so it falls below 0.5, e.g. 0.333.) SHAP: CatBoost's own ``ShapValues`` (expected value in the LAST column; the
authors read the first and shifted every head by one), summarised per head as the largest
difference between the mean SHAP values of its categories.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from apmae.config import setting


@dataclass(frozen=True)
class ClassifierConfig:
    """Per-task CatBoost on per-head cluster ids (paper 6.1) and its cross-validation."""

    iterations: int = setting(1000, "CatBoost iterations")
    depth: int = setting(6, "CatBoost depth")
    learning_rate: float = setting(0.1, "CatBoost learning rate")
    early_stopping_rounds: int = setting(25, "Early stopping rounds (10% of each training part held out)")
    one_hot_max_size: int = setting(2, "CatBoost one_hot_max_size")
    # CatBoost's default (4) builds CTRs of feature combinations; with 720+ categorical heads
    # that dominates the fit. 1 (single-head CTRs only) is ~5x faster at equal held-out
    # accuracy (benchmarks/classifier.py); the paper does not set it.
    max_ctr_complexity: int = setting(1, "CatBoost max_ctr_complexity (its default, 4, is ~5x slower at 720 heads)")
    folds: int = setting(10, "Cross-validation folds")
    threads: int = setting(-1, "CatBoost threads (-1: all cores)")
    seed: int = setting(0, "Seed for balancing, CV and CatBoost")


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


def varies(x: pd.DataFrame) -> bool:
    """Whether any head's cluster id differs between the rows (else there is nothing to learn)."""
    return bool((x.nunique(dropna=False) > 1).any())


def _model(cfg: ClassifierConfig, cat_features: list[int]):
    from catboost import CatBoostClassifier

    return CatBoostClassifier(iterations=cfg.iterations, depth=cfg.depth, learning_rate=cfg.learning_rate,
                              one_hot_max_size=cfg.one_hot_max_size, max_ctr_complexity=cfg.max_ctr_complexity,
                              thread_count=cfg.threads,
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


def cross_validate(x: pd.DataFrame, y: pd.Series, cfg: ClassifierConfig, groups: pd.Series | None = None) -> dict:
    """k-fold CV on balanced rows: pooled out-of-fold accuracy, its 95% Wilson interval, chance level.

    ``mean`` is the accuracy over all out-of-fold predictions (each row predicted once),
    ``ci95`` its Wilson interval ``[low, high]``; ``fold_accuracy`` is kept for inspection.
    ``chance_level`` is 0.5 (the rows are balanced); ``baseline`` is the accuracy of the best
    constant prediction on these rows (the majority share, 0.5 when balanced); ``p_value`` is
    a two-sided exact binomial test of the pooled accuracy against ``baseline``.

    ``groups`` (row -> file id): folds keep each file's samples together (stratified group
    k-fold), so no test sample shares a file with a training sample; without, folds split by
    sample.
    """
    from scipy.stats import binomtest
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    from apmae.stats import wilson_interval

    folds = min(cfg.folds, int(y.value_counts().min()))
    if groups is not None:
        folds = min(folds, int(groups.nunique()))
    if folds < 2 or y.nunique() < 2:
        raise ValueError(f"need at least 2 samples of each label (and 2 files) for CV, have {dict(y.value_counts())}")
    yi = y.astype(int).to_numpy()
    hit = np.zeros(len(y), dtype=bool)
    fold_acc = []
    if groups is None:
        splits = StratifiedKFold(folds, shuffle=True, random_state=cfg.seed).split(x, y)
    else:
        splits = StratifiedGroupKFold(folds, shuffle=True, random_state=cfg.seed).split(x, y, groups.to_numpy())
    for train, test in splits:
        if varies(x.iloc[train]):
            pred = fit(x.iloc[train], y.iloc[train], cfg).predict(x.iloc[test]).astype(int).ravel()
        else:
            # CatBoost refuses a fit on no varying feature; a model that sees nothing predicts
            # its training part's majority, which is what this fold then scores
            pred = np.full(len(test), int(yi[train].mean() > 0.5))
        hit[test] = pred == yi[test]
        fold_acc.append(float(hit[test].mean()))
    n, k = len(y), int(hit.sum())
    lo, hi = wilson_interval(k, n)
    share = float(yi.mean())
    baseline = max(share, 1 - share)
    return {"folds": folds, "n": n, "correct": k, "mean": k / n, "ci95": [lo, hi],
            "ci_method": "Wilson 95% over pooled out-of-fold predictions", "fold_accuracy": fold_acc,
            "chance_level": 0.5, "baseline": baseline, "balanced": share == 0.5,
            "cv_split": "by sample" if groups is None else "by file",
            "p_value": float(binomtest(k, n, baseline).pvalue)}


def model_correct_rate(labels) -> dict:
    """The target model's own accuracy on a task: its correct rate over ALL labelled candidates
    (not the balanced rows, whose rate is 0.5 by construction), with n and a Wilson CI."""
    from apmae.stats import proportion

    return proportion(bool(v) for v in labels if v is not None)


@dataclass
class TaskFit:
    """The outcome of :func:`fit_task` for one (target model, task)."""

    result: dict  # the report row: n_balanced, CV numbers, top heads, ... or "skipped"
    model: object | None = None  # the final CatBoost model, fit on every balanced row
    importance: pd.Series | None = None  # per head SHAP spread
    train_ids: list[str] | None = None  # the sample ids the final model was fit on


def fit_task(labels: pd.Series, rows: dict[str, dict[str, int]], columns: list[str], cfg: ClassifierConfig,
             min_rows: int = 20, files: dict[str, str] | None = None) -> TaskFit:
    """The paper's fit protocol for one task (section 6).

    ``labels``: sample id -> correct (bool) for the samples that have a complete feature row;
    ``rows``: sample id -> {head column: cluster id}. Balance correct/incorrect (the minority
    kept whole), skip (with the reason) when there are fewer than ``min_rows`` balanced rows,
    10-fold CV (:func:`cross_validate`; by file when ``files``, sample id -> file id, is
    given), then the final model on every balanced row and its SHAP head importance.
    """
    import time

    t0 = time.perf_counter()
    if labels.nunique() < 2:
        return TaskFit({"skipped": "one label only", "n_labelled_rows": len(labels)})
    idx = balance(labels, cfg.seed)
    if len(idx) < min_rows:
        return TaskFit({"skipped": f"{len(idx)} balanced rows < {min_rows}", "n_labelled_rows": len(labels)})
    if files is not None and len({files[s] for s in idx}) < 2:
        return TaskFit({"skipped": "balanced rows from fewer than 2 files (CV is by file)",
                        "n_labelled_rows": len(labels)})
    x = feature_frame({s: rows[s] for s in idx}, columns)
    if not varies(x):  # e.g. every head one cluster: a finding (no signal), not a crash
        return TaskFit({"skipped": "no head's cluster id varies over the balanced rows (no feature to fit)",
                        "n_balanced": len(idx), "n_labelled_rows": len(labels)})
    y = labels.loc[idx]
    groups = None if files is None else pd.Series([files[s] for s in idx], index=idx)
    cv = cross_validate(x, y, cfg, groups)
    clf = fit(x, y, cfg)
    shap, _ = shap_values(clf, x)
    imp = head_importance(shap, x)
    result = {"n_balanced": len(idx), "n_labelled_rows": len(labels), **cv,
              "top_heads": imp.head(10).round(4).to_dict(), "importance": imp.round(6).to_dict(),
              "seconds": time.perf_counter() - t0}
    return TaskFit(result, clf, imp, [str(s) for s in idx])


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
