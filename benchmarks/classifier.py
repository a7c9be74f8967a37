"""Classifier cost per task: CatBoost fit and SHAP at 10k rows x 720 heads; live scoring rows/s.

Synthetic rows like SmolLM2-scale mining data: 720 categorical heads with 2-20 clusters
each (noise -1 included), the label set by 6 planted heads plus noise. Per setting, in the
same run on the same rows: fit time (90/10 split for early stopping, the paper's
iterations / depth / learning rate), held-out accuracy, SHAP time for 10k rows, and whether
SHAP's top 6 heads are the planted ones. ``paper`` is CatBoost's own defaults beyond the
paper's parameters (feature-combination CTRs up to 4); ``ours`` is ``ClassifierConfig()``.

Live scoring: the real ``Scorer`` on the embedded broker and Redis, fed every row's 720
assignments, shuffled; rows/s from the first assignment consumed to the last score flushed.

    python benchmarks/classifier.py [--rows 10000] [--live-rows 300]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._common import embedded_infra, table, write_result  # noqa: E402

HEADS, INFORMATIVE = 720, 6


def planted(n: int, seed: int = 0) -> tuple[pd.DataFrame, pd.Series, list[str]]:
    """(n, 720) string categories, balanced bool labels, the informative columns."""
    from apmae.classify import column

    rng = np.random.default_rng(seed)
    cats = rng.integers(2, 21, HEADS)
    x = np.stack([rng.integers(-1, c - 1, n) for c in cats], axis=1)
    informative = rng.choice(HEADS, INFORMATIVE, replace=False)
    score = sum((x[:, j] % 2 == 0).astype(float) for j in informative) + rng.normal(0, 0.7, n)
    y = pd.Series(score > np.median(score))
    cols = [column(j // 9, j % 9) for j in range(HEADS)]  # 80 layers x 9 heads, SmolLM2-like naming
    return pd.DataFrame(x.astype(str), columns=cols), y, [cols[j] for j in informative]


def fit_rows(n: int, settings: dict) -> list[dict]:
    from apmae.classify import fit, head_importance, shap_values

    x, y, informative = planted(n + 2000)
    xt, yt, xe, ye = x[:n], y[:n], x[n:], y[n:]
    rows = []
    for name, cfg in settings.items():
        t0 = time.perf_counter()
        model = fit(xt, yt, cfg)
        fit_s = time.perf_counter() - t0
        acc = float((model.predict(xe).astype(int).ravel() == ye.astype(int).to_numpy()).mean())
        t0 = time.perf_counter()
        shap, _ = shap_values(model, xt)
        shap_s = time.perf_counter() - t0
        top = list(head_importance(shap, xt).index[:INFORMATIVE])
        rows.append({"setting": name, "rows": n, "features": HEADS, "fit_s": fit_s, "trees": model.tree_count_,
                     "held_out_acc": acc, "shap_s": shap_s, "planted_in_top6": len(set(top) & set(informative))})
        print(table(rows[-1:], list(rows[-1])), flush=True)
    return rows


def live_scoring(n_rows: int) -> dict:
    import redis

    from apmae.classify import ClassifierConfig, fit
    from apmae.config import BusConfig
    from apmae.topics import ASSIGNMENTS, SCORES, AssignmentRecord
    from services.bus import Bus, Output, read_range
    from services.classifier import ClassifyConfig, Scorer
    from services.registry import ArtifactStore, Registry, sha256_file

    x, y, _ = planted(2000 + n_rows, seed=1)
    model = fit(x[:2000], y[:2000], ClassifierConfig(iterations=200, threads=2))
    with embedded_infra() as infra:
        state = Path(infra.state_dir)
        bus_cfg = BusConfig(bootstrap_servers=f"127.0.0.1:{infra.kafka_port}", redis_url=infra.redis_url,
                            state_dir=state, topic_prefix="bench.")
        cfg = ClassifyConfig(**vars(bus_cfg))
        store = ArtifactStore(cfg.artifacts_dir)
        dest = store.path("classifier/bench/m/identifier.cbm")
        dest.parent.mkdir(parents=True, exist_ok=True)
        model.save_model(str(dest))
        Registry(redis.Redis.from_url(cfg.redis_url), cfg.topic_prefix).put(
            "classifier", "m:identifier", path="classifier/bench/m/identifier.cbm", sha256=sha256_file(dest),
            version="bench", columns=list(x.columns), cv_mean=0.0)
        bus = Bus(cfg, "bench")
        bus.ensure_topics()
        live = x.iloc[2000:]
        records = []
        for i, (sid, row) in enumerate(live.iterrows()):
            for col, cluster in row.items():
                layer, head = map(int, col[1:].split("H"))
                records.append(AssignmentRecord(id=f"a{sid}-{col}", sample_id=f"s{sid}", model="m", task="identifier",
                                                layer=layer, head=head, correct=bool(y.iloc[2000 + i]),
                                                cluster=int(cluster), strength=1.0, cluster_version="bench"))
        random.Random(0).shuffle(records)
        for r in records:
            bus.send(Output(ASSIGNMENTS, r, key=r.sample_id))
        bus.flush()
        scorer = Scorer(cfg)
        t0 = time.perf_counter()
        scorer.processor().run(max_messages=len(records), idle_timeout_s=10)
        seconds = time.perf_counter() - t0
        scores = [m for m in read_range(bus, SCORES)]
    return {"rows": n_rows, "assignments": len(records), "scored": len(scores), "seconds": seconds,
            "rows_per_s": len(scores) / seconds, "assignments_per_s": len(records) / seconds}


def main() -> None:
    from apmae.classify import ClassifierConfig

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--live-rows", type=int, default=300)
    ap.add_argument("--skip-paper", action="store_true", help="skip CatBoost's default CTR setting (slow)")
    args = ap.parse_args()
    ours = ClassifierConfig(threads=2)
    settings = {"ours": ours} if args.skip_paper else {"paper": replace(ours, max_ctr_complexity=4), "ours": ours}
    rows = fit_rows(args.rows, settings)
    print(table(rows, list(rows[0])))
    live = live_scoring(args.live_rows)
    print(table([live], list(live)))
    print("wrote", write_result("classifier", {"fit": rows, "live": live}))


if __name__ == "__main__":
    main()
