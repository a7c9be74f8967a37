"""Per-head clustering of AP-MAE embeddings (paper 5.1 Clustering) and incremental assignment.

For every head separately: UMAP to 8 dimensions (cosine, 20 neighbours, min_dist 0.05), then
HDBSCAN (min_samples 20, min_cluster_size 25, single cluster allowed); noise (-1) is its own
category. Exact duplicate embeddings are jittered slightly first (UMAP's neighbour graph
degenerates on exact ties; the authors did the same).

Two speed choices that are ours, measured in ``benchmarks/cluster.py`` against the paper's
exact pipeline and plain umap-learn + hdbscan on the same data (ARI between them reported):

* ``reduce``: L2-normalise, then PCA to 64 dims, then UMAP with the euclidean metric. On unit
  vectors euclidean distance is a monotone function of cosine distance, so the neighbour
  graph is the paper's; PCA only drops directions with almost no variance (the explained
  variance is recorded per head). The nearest-neighbour search, most of UMAP's cost on
  512-d input, gets ~8x fewer dimensions.
* ``n_epochs`` fixed at 100: umap-learn picks 500 for <= 10k points and 200 above; the
  layout is half of a 110k-point fit, and 100 epochs give the same clusters (ARI 0.999 to
  200 epochs at 110k points, 0.99+ to the paper's exact pipeline at every size measured).

New embeddings are assigned river-style (``predict_one`` / ``predict_many``): UMAP's
``transform`` into the fitted 8-d space, then one of two assigners:

* ``knn`` (default): the majority cluster of the 15 nearest fitted points in the 8-d space,
  membership strength = the share of neighbours that agree. It needs no HDBSCAN prediction
  data, which at 110k points costs more than the clustering itself (measured: +127 s vs 74 s);
  ``benchmarks/cluster.py`` measures its agreement with HDBSCAN's own approximate_predict.
* ``hdbscan``: ``hdbscan.approximate_predict`` (fit with ``prediction_data=True``).

A drift detector on the assignment stream decides when a head is refitted (see
:class:`DriftMonitor`; the assigner publishes the refit job).

One embedding space per fit: embeddings made by different AP-MAE checkpoints are not
comparable, so a cluster plan (:func:`plan_heads`) takes one checkpoint's embeddings, a
fitted head records that checkpoint, and only embeddings of the same checkpoint are assigned
to it or refit with it (:func:`same_space`).
"""

from __future__ import annotations

import hashlib
import io
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from apmae.codec import BadPattern
from apmae.config import setting


@dataclass(frozen=True)
class ClusterConfig:
    """One head's clustering (paper 5.1: UMAP to 8-d, HDBSCAN), and how new points are assigned."""

    n_components: int = setting(8, "UMAP output dimensions")
    n_neighbors: int = setting(20, "UMAP neighbours")
    min_dist: float = setting(0.05, "UMAP min_dist")
    metric: str = setting("cosine", "UMAP metric (cosine or euclidean with PCA)")
    min_samples: int = setting(20, "HDBSCAN min_samples")
    min_cluster_size: int = setting(25, "HDBSCAN min_cluster_size")
    allow_single_cluster: bool = setting(True, "HDBSCAN may return one cluster")
    assigner: str = setting("knn", "Assignment of new points: knn or hdbscan (approximate_predict)",
                            choices=("knn", "hdbscan"))
    knn: int = setting(15, "Neighbours of the knn assigner")
    # The paper's exact pipeline by default (UMAP cosine on the raw embeddings, umap-learn's
    # epochs): the faster PCA-64 / 100-epoch path agreed with it at a median ARI of only 0.885
    # over the study's 36 heads of real AP-MAE embeddings (benchmarks/umap_validation.py; it
    # had been validated on synthetic groups alone), below the 0.9 the study set for keeping it.
    n_epochs: int | None = setting(0, "UMAP epochs (0 or None = umap-learn's default: 500 up to 10k points, "
                                      "200 above; 100 with --pca-components 64 is the faster path)")
    pca_components: int = setting(0, "PCA dims before UMAP, on unit vectors for cosine (0 = off: the paper's "
                                     "exact pipeline; 64 is ~1.5x faster, ARI 0.885 to it on real embeddings)")
    jitter: float = setting(1e-6, "Scale of the jitter that separates exact duplicate embeddings")
    cluster_seed: int = setting(0, "Seed of PCA, UMAP and the jitter")


def jitter_duplicates(x: np.ndarray, scale: float, seed: int = 0) -> tuple[np.ndarray, int]:
    """Add tiny noise to exact duplicate rows (all but the first of each); returns (x, count)."""
    _, first, counts = np.unique(x, axis=0, return_index=True, return_counts=True)
    dup = np.ones(len(x), dtype=bool)
    dup[first] = False
    n = int(dup.sum())
    if n:
        x = x.copy()
        rng = np.random.default_rng(seed)
        norm = np.linalg.norm(x[dup], axis=1, keepdims=True) + 1e-12
        x[dup] += rng.normal(size=(n, x.shape[1])) * scale * norm
    return x, n


@dataclass
class HeadModel:
    """A fitted head: UMAP + HDBSCAN (+ the fitted 8-d points and labels for kNN assignment)."""

    cfg: ClusterConfig
    umap: object
    hdbscan: object
    embedding: np.ndarray  # (N, 8) fitted low-dimensional points
    labels: np.ndarray  # (N,) cluster ids, -1 = noise
    pca: object | None = None  # sklearn PCA (of unit vectors for cosine), when cfg.pca_components
    fit_seconds: float = 0.0
    duplicates_jittered: int = 0
    explained_variance: float = 1.0  # share of the normalised input's variance the PCA kept
    stage_seconds: dict[str, float] = field(default_factory=dict)  # pca, umap, hdbscan
    mean_cosine: float = float("nan")  # mean pairwise cosine of the input: near 1 = one vector, nothing to cluster
    _knn: object | None = field(default=None, repr=False)

    @property
    def n_clusters(self) -> int:
        return int(len(set(self.labels.tolist()) - {-1}))

    @property
    def noise_rate(self) -> float:
        return float((self.labels == -1).mean()) if len(self.labels) else 0.0

    def _neighbours(self):
        if self._knn is None:
            from sklearn.neighbors import NearestNeighbors

            self._knn = NearestNeighbors(n_neighbors=min(self.cfg.knn, len(self.labels))).fit(self.embedding)
        return self._knn

    def predict_many(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x: (M, D) embeddings -> (cluster ids (M,), membership strengths (M,) in [0, 1])."""
        low = self.umap.transform(_reduce(np.asarray(x, dtype=np.float32), self.pca, self.cfg.metric == "cosine"))
        if self.cfg.assigner == "hdbscan":
            import hdbscan

            labels, strengths = hdbscan.approximate_predict(self.hdbscan, low)
            return np.asarray(labels), np.asarray(strengths, dtype=np.float64)
        idx = self._neighbours().kneighbors(low, return_distance=False)
        votes = self.labels[idx]  # (M, k)
        out, strength = np.empty(len(x), dtype=int), np.empty(len(x))
        for i, row in enumerate(votes):
            vals, counts = np.unique(row, return_counts=True)
            j = int(np.argmax(counts))
            out[i], strength[i] = vals[j], counts[j] / len(row)
        return out, strength

    def predict_one(self, x: np.ndarray) -> tuple[int, float]:
        labels, strengths = self.predict_many(np.asarray(x)[None])
        return int(labels[0]), float(strengths[0])

    def to_bytes(self) -> bytes:
        """Pickled (joblib) bytes; loaders must check the SHA-256 recorded in the registry first."""
        import joblib

        buf = io.BytesIO()
        self._knn = None
        joblib.dump(self, buf, compress=3)
        return buf.getvalue()

    @staticmethod
    def from_bytes(data: bytes, expected_sha256: str) -> HeadModel:
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected_sha256:
            raise ValueError(f"cluster model checksum {digest} != registry {expected_sha256}: refusing to unpickle")
        import joblib

        return joblib.load(io.BytesIO(data))


def _reduce(x: np.ndarray, pca, cosine: bool) -> np.ndarray:
    """(N, D) -> (N, pca_components) PCA scores (of unit vectors for cosine), or x without a PCA."""
    if pca is None:
        return x
    if cosine:
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
    return pca.transform(x).astype(np.float32)


def mean_pairwise_cosine(x: np.ndarray) -> float:
    """Mean cosine similarity over all pairs of distinct rows, in O(N D): with unit rows u,
    sum_{i != j} u_i . u_j = |sum u|^2 - N. Near 1: the head's embeddings are nearly one
    vector (an undertrained AP-MAE), and one cluster is all there is to find."""
    u = np.asarray(x, dtype=np.float64)
    n = len(u)
    if n < 2:
        return float("nan")
    u = u / (np.linalg.norm(u, axis=1, keepdims=True) + 1e-12)
    s = u.sum(0)
    return float((s @ s - n) / (n * (n - 1)))


def fit_head(x: np.ndarray, cfg: ClusterConfig = ClusterConfig()) -> HeadModel:
    """x: (N, D) embeddings of one head -> fitted HeadModel.

    One thread on purpose: heads are fitted in parallel by processes (one per core), and a
    seeded UMAP is single-threaded in umap-learn anyway.
    """
    import hdbscan
    import umap

    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    x = np.asarray(x, dtype=np.float32)
    spread = mean_pairwise_cosine(x)
    x, dups = jitter_duplicates(x, cfg.jitter, cfg.cluster_seed)
    pca, explained, metric = None, 1.0, cfg.metric
    if cfg.pca_components and cfg.pca_components < x.shape[1] and len(x) > cfg.pca_components:
        from sklearn.decomposition import PCA

        if cfg.metric not in ("cosine", "euclidean"):
            raise ValueError(f"pca_components needs metric cosine or euclidean, not {cfg.metric!r}")
        cosine = cfg.metric == "cosine"
        pca = PCA(cfg.pca_components, random_state=cfg.cluster_seed).fit(
            x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12) if cosine else x)
        explained = float(pca.explained_variance_ratio_.sum())
        x, metric = _reduce(x, pca, cosine), "euclidean"
    stages["pca"] = time.perf_counter() - t0
    n_neighbors = min(cfg.n_neighbors, max(2, len(x) - 1))
    reducer = umap.UMAP(n_components=cfg.n_components, n_neighbors=n_neighbors, min_dist=cfg.min_dist,
                        metric=metric, n_epochs=cfg.n_epochs or None, random_state=cfg.cluster_seed, n_jobs=1)
    low = reducer.fit_transform(x)
    stages["umap"] = time.perf_counter() - t0 - sum(stages.values())
    clusterer = hdbscan.HDBSCAN(min_samples=min(cfg.min_samples, len(x) - 1), min_cluster_size=cfg.min_cluster_size,
                                allow_single_cluster=cfg.allow_single_cluster,
                                prediction_data=cfg.assigner == "hdbscan", core_dist_n_jobs=1)
    labels = clusterer.fit_predict(low)
    stages["hdbscan"] = time.perf_counter() - t0 - sum(stages.values())
    return HeadModel(cfg, reducer, clusterer, low, np.asarray(labels), pca, time.perf_counter() - t0, dups, explained,
                     stages, spread)


class DriftMonitor:
    """Per-head drift and novelty: one ADWIN (river) per category on its indicator.

    A cluster id is a category, not a number: the mean of the ids says nothing (clusters 0
    and 2 alternating average to 1, exactly like cluster 1 alone). So each category (noise,
    -1, included) gets an ADWIN on "this assignment is in it", i.e. on its share of the
    stream. ``update`` returns True when any share changes: the head's clusters no longer
    describe its new patterns, and it should be refitted. ``clusters``: the fitted model's
    labels (a category first seen later gets its detector then).
    """

    def __init__(self, delta: float = 0.002, clusters: Iterable[int] = ()):
        self.delta = delta
        self.shares: dict[int, object] = {}
        for c in sorted(set(clusters) | {-1}):
            self._detector(c)
        self.n = 0
        self.noise_count = 0

    def _detector(self, c: int):
        from river import drift

        if c not in self.shares:
            self.shares[c] = drift.ADWIN(delta=self.delta)
        return self.shares[c]

    def update(self, cluster: int) -> bool:
        self.n += 1
        self.noise_count += cluster == -1
        self._detector(int(cluster))
        changed = False
        for c, adwin in self.shares.items():
            adwin.update(1.0 if c == cluster else 0.0)
            changed |= bool(adwin.drift_detected)
        return changed

    @property
    def noise_rate(self) -> float:
        return self.noise_count / max(1, self.n)


def embedding_vector(payload: bytes, dim: int) -> np.ndarray:
    """The ``(dim,)`` float32 vector of an embedding record's payload (little-endian float32);
    BadPattern when the length does not match ``dim`` or a value is not finite."""
    v = np.frombuffer(payload, dtype="<f4")
    if v.shape[0] != dim or not np.isfinite(v).all():
        raise BadPattern(f"embedding payload of {v.shape[0]} values (dim {dim}) or non-finite")
    return v


def same_space(embedding_checkpoint: str, fitted_checkpoint: str) -> bool:
    """May an embedding be assigned to (or refit with) a head fitted on ``fitted_checkpoint``?
    Only when the same AP-MAE checkpoint made it (an unrecorded fit checkpoint, "", from
    before this was recorded, cannot be checked and is accepted)."""
    return not fitted_checkpoint or embedding_checkpoint == fitted_checkpoint


@dataclass
class HeadPlan:
    """What a cluster plan fits: per head, the ids of one checkpoint's embeddings."""

    checkpoint: str
    heads: dict[str, list[str]]  # head key -> embedding ids to fit (>= min_points of them)
    skipped: dict[str, int]  # head key -> embeddings of the checkpoint, below min_points
    other_checkpoints: int  # embeddings left out: made by another checkpoint
    duplicates: int  # embedding ids seen more than once


def plan_heads(embeddings: Iterable[tuple[str, str, str]], checkpoint: str = "", min_points: int = 30) -> HeadPlan:
    """The cluster plan (paper 5.1, per head): ``embeddings`` are (embedding id, head key,
    checkpoint) in any order, duplicates allowed. One checkpoint (``checkpoint``, default the
    one that made the most embeddings) so that every head is fitted in one embedding space;
    heads with fewer than ``min_points`` of its embeddings are not fitted."""
    seen: set[str] = set()
    by_head: dict[str, list[str]] = defaultdict(list)
    tags: Counter = Counter()
    rows: list[tuple[str, str, str]] = []
    duplicates = 0
    for eid, key, tag in embeddings:
        if eid in seen:
            duplicates += 1
            continue
        seen.add(eid)
        tags[tag] += 1
        rows.append((eid, key, tag))
    if not rows:
        return HeadPlan(checkpoint, {}, {}, 0, duplicates)
    tag = checkpoint or max(sorted(tags), key=tags.__getitem__)
    for eid, key, t in rows:
        if t == tag:
            by_head[key].append(eid)
    heads = {k: v for k, v in sorted(by_head.items()) if len(v) >= min_points}
    skipped = {k: len(v) for k, v in sorted(by_head.items()) if len(v) < min_points}
    return HeadPlan(tag, heads, skipped, len(rows) - tags[tag], duplicates)
