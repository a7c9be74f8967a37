"""Per-head clustering cost: our pipeline vs the paper's exact one vs plain library defaults.

On the same synthetic 512-d embeddings with 20 planted groups of unequal size and spread
(plus 3% background points), at each size:

* ``plain``: ``umap.UMAP()`` then ``hdbscan.HDBSCAN()``, every setting left at its default
  (2-d output, euclidean, 15 neighbours, numba threads on every core).
* ``paper``: the paper's parameters exactly (8-d, cosine, 20 neighbours, min_dist 0.05,
  HDBSCAN 20/25), umap-learn's epoch default, one thread (our earlier pipeline).
* ``ours``: :func:`apmae.cluster.fit_head` with its defaults: the paper's parameters after
  unit-normalise + PCA-64, euclidean on those, 100 epochs, one thread.

Wall and CPU seconds are both reported: plain uses both cores, ours one (the fit workers
run one head per core). Quality: ARI against the planted groups and against ``paper``.
Every variant is first run once on 5000 points (above umap-learn's 4096-point switch to
NN-descent, so that path is compiled too) so numba's compile (paid once per worker process,
not per head) stays out of the timings; it is reported separately.
Then assignment throughput of new points (UMAP transform + kNN / HDBSCAN approximate
predict) and the projected wall time for 720 and 1920 heads.

    python benchmarks/cluster.py [--sizes 10000 30000 110000] [--assign 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._common import table, write_result  # noqa: E402

warnings.filterwarnings("ignore")  # umap: "n_jobs value 1 overridden ... by setting random_state"


def planted(n: int, dim: int = 512, k: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) embeddings on a 48-d subspace, k groups, 3% background labelled -1."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(48, dim)) / np.sqrt(48)
    centres = rng.normal(size=(k, 48)) * 2.0
    y = rng.choice(k, n, p=rng.dirichlet(np.full(k, 2.0)))
    z = centres[y] + rng.normal(size=(n, 48)) * rng.uniform(0.4, 1.2, k)[y][:, None]
    x = z @ basis + rng.normal(size=(n, dim)) * 0.05
    background = rng.random(n) < 0.03
    x[background] = rng.normal(size=(int(background.sum()), 48)) @ basis * 3
    y[background] = -1
    return x.astype(np.float32), y


def plain(x: np.ndarray) -> np.ndarray:
    import hdbscan
    import umap

    return hdbscan.HDBSCAN().fit_predict(umap.UMAP().fit_transform(x))


def variants():
    from apmae.cluster import ClusterConfig, fit_head

    return {
        "plain": plain,
        "paper": lambda x: fit_head(x, ClusterConfig(pca_components=0, n_epochs=None)).labels,
        "ours": lambda x: fit_head(x, ClusterConfig()).labels,
    }


def timed(fn, *args):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    from sklearn.metrics import adjusted_rand_score as ari

    from apmae.cluster import ClusterConfig, fit_head

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 110_000])
    ap.add_argument("--assign", type=int, default=2000, help="new points to assign")
    ap.add_argument("--variants", nargs="+", default=["plain", "paper", "ours"])
    args = ap.parse_args()
    fns = {k: v for k, v in variants().items() if k in args.variants}

    warm = {}
    xw, _ = planted(5000, seed=99)
    for name, fn in fns.items():
        warm[name] = timed(fn, xw)[1]
    print("first call per process (numba compile + a 5000-point fit), s:", {k: round(v, 1) for k, v in warm.items()})

    rows, seconds = [], {}
    for n in args.sizes:
        x, y = planted(n)
        labels = {}
        for name, fn in fns.items():
            labels[name], wall, cpu = timed(fn, x)
            seconds[(name, n)] = wall
            ref = labels.get("paper")
            rows.append({"n": n, "pipeline": name, "wall_s": wall, "cpu_s": cpu,
                         "clusters": len(set(labels[name].tolist()) - {-1}), "noise": float(np.mean(labels[name] == -1)),
                         "ari_truth": ari(y, labels[name]), "ari_vs_paper": ari(ref, labels[name]) if ref is not None else None})
            print(table(rows[-1:], list(rows[-1])), flush=True)
    print(table(rows, list(rows[0])))

    ratios = []
    for n in args.sizes:
        r = {"n": n}
        if ("plain", n) in seconds and ("ours", n) in seconds:
            r["ours_vs_plain_wall"] = seconds[("ours", n)] / seconds[("plain", n)]
        if ("paper", n) in seconds and ("ours", n) in seconds:
            r["ours_vs_paper_wall"] = seconds[("ours", n)] / seconds[("paper", n)]
        ratios.append(r)
    print(table(ratios, sorted({k for r in ratios for k in r}, key=lambda k: k != "n")))

    # assignment of new points to a fitted head, both assigners, at the middle size
    n_fit = sorted(args.sizes)[len(args.sizes) // 2]
    x, y = planted(n_fit + args.assign, seed=1)
    assign_rows = []
    for assigner in ("knn", "hdbscan"):
        model = fit_head(x[:n_fit], ClusterConfig(assigner=assigner))
        model.predict_many(x[n_fit:n_fit + 50])  # compile the transform path
        (labels, _), wall, _ = timed(model.predict_many, x[n_fit + 50:])
        agree = ari(y[n_fit + 50:], labels)
        assign_rows.append({"fitted_on": n_fit, "assigner": assigner, "points": args.assign - 50,
                            "points_per_s": (args.assign - 50) / wall, "ari_truth": agree,
                            "fit_wall_s": model.fit_seconds})
    print(table(assign_rows, list(assign_rows[0])))

    # projection: heads fitted one per core, each worker process paying numba's compile once
    projections = []
    if "ours" in fns:
        for n in args.sizes:
            per_head = seconds[("ours", n)]
            for heads in (720, 1920):
                for machines in (1, 10):
                    cores = 2 * machines
                    hours = (heads * per_head / cores + warm["ours"]) / 3600
                    projections.append({"n_per_head": n, "heads": heads, "machines_2_core": machines,
                                        "hours": hours, "plain_hours": heads * seconds.get(("plain", n), np.nan) / machines / 3600})
        print(table(projections, list(projections[0])))
    print("wrote", write_result("cluster", {"warmup_s": warm, "rows": rows, "ratios": ratios,
                                            "assignment": assign_rows, "projections": projections}))


if __name__ == "__main__":
    main()
