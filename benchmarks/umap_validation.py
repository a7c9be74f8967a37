"""Is the default clustering pipeline the paper's, on real AP-MAE embeddings? (#15 part 5)

The default (:class:`apmae.cluster.ClusterConfig`) unit-normalises, projects to PCA-64 and
runs UMAP euclidean for 100 epochs; the paper runs UMAP with the cosine metric on the raw
512-d embeddings, umap-learn's default epochs. The default was validated only on synthetic
groups. Here both pipelines fit every head the study's cluster plan stored (its per-head
matrices under ``<state>/artifacts/clusters/<version>/data/*.npz``: the real AP-MAE
embeddings of the study's mined samples) and we report, per head, the adjusted Rand index
between their HDBSCAN labels, the cluster counts and noise shares, and the time of each.

Decision rule (issue #15): if the median ARI over heads is below 0.9, the default changes
to the paper-exact pipeline. Heads where both pipelines find a single cluster agree
trivially (ARI 1.0 on identical all-one labels): they are counted apart.

    python benchmarks/umap_validation.py --state-dir .apmae-study [--heads 36]
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


def head_matrices(state_dir: Path, version: str | None) -> tuple[str, list[tuple[str, np.ndarray]]]:
    root = state_dir / "artifacts" / "clusters"
    versions = sorted((d for d in root.iterdir() if (d / "data").is_dir()), key=lambda d: d.stat().st_mtime)
    if not versions:
        raise SystemExit(f"no cluster plan under {root}: run the study (or the demo) first")
    chosen = root / version if version else versions[-1]
    out = []
    for f in sorted((chosen / "data").rglob("*.npz")):
        key = str(f.relative_to(chosen / "data"))[: -len(".npz")]
        out.append((key, np.load(f)["x"]))
    return chosen.name, out


def main() -> None:
    from sklearn.metrics import adjusted_rand_score

    from apmae.cluster import ClusterConfig, fit_head

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state-dir", type=Path, default=Path(".apmae-study"))
    ap.add_argument("--version", default=None, help="Cluster plan version (default: the latest)")
    ap.add_argument("--heads", type=int, default=0, help="At most this many heads (0 = every head)")
    ap.add_argument("--min-cluster-size", type=int, default=15, help="As the study fits them")
    ap.add_argument("--min-samples", type=int, default=5, help="As the study fits them")
    args = ap.parse_args()

    version, heads = head_matrices(args.state_dir, args.version)
    if args.heads:
        heads = heads[: args.heads]
    ours = ClusterConfig(min_cluster_size=args.min_cluster_size, min_samples=args.min_samples)
    paper = ClusterConfig(min_cluster_size=args.min_cluster_size, min_samples=args.min_samples, pca_components=0,
                          n_epochs=None)
    rows = []
    for key, x in heads:
        t0 = time.perf_counter()
        a = fit_head(x, ours)
        t1 = time.perf_counter()
        b = fit_head(x, paper)
        t2 = time.perf_counter()
        ka, kb = int(a.labels.max()) + 1, int(b.labels.max()) + 1
        rows.append({"head": key, "n": len(x), "mean_cosine": round(float(a.mean_cosine), 4),
                     "ari": float(adjusted_rand_score(b.labels, a.labels)), "clusters_ours": ka, "clusters_paper": kb,
                     "noise_ours": float(np.mean(a.labels == -1)), "noise_paper": float(np.mean(b.labels == -1)),
                     "s_ours": t1 - t0, "s_paper": t2 - t1, "trivial": ka <= 1 and kb <= 1})
        print(f"{key}: n={len(x)} ARI {rows[-1]['ari']:.3f} clusters {ka} vs {kb}", flush=True)
    informative = [r for r in rows if not r["trivial"]]
    aris = np.array([r["ari"] for r in informative]) if informative else np.array([])
    summary = {
        "plan_version": version, "heads": len(rows), "informative_heads": len(informative),
        "trivial_heads": len(rows) - len(informative),
        "ari_median": float(np.median(aris)) if len(aris) else None,
        "ari_mean": float(aris.mean()) if len(aris) else None,
        "ari_min": float(aris.min()) if len(aris) else None,
        "heads_ari_below_0_9": int((aris < 0.9).sum()),
        "seconds_ours": float(sum(r["s_ours"] for r in rows)), "seconds_paper": float(sum(r["s_paper"] for r in rows)),
        "decision": ("no informative head (every head one cluster in both): the data cannot validate the default"
                     if not len(aris) else
                     "keep the default (median ARI >= 0.9)" if np.median(aris) >= 0.9 else
                     "change the default to the paper-exact pipeline (median ARI < 0.9)"),
    }
    print(table(rows, ["head", "n", "mean_cosine", "ari", "clusters_ours", "clusters_paper", "noise_ours", "noise_paper",
                       "s_ours", "s_paper"]))
    print({k: v for k, v in summary.items()})
    print("wrote", write_result("umap_validation", {"summary": summary, "rows": rows,
                                                     "config": {"ours": vars(ours), "paper": vars(paper)}}))


if __name__ == "__main__":
    main()
