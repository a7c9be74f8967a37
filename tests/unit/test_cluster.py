"""Per-head clustering on synthetic embeddings with known groups."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from apmae.cluster import (
    ClusterConfig,
    DriftMonitor,
    HeadModel,
    fit_head,
    jitter_duplicates,
)


def groups(n_per: int, k: int = 5, dim: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 4
    y = np.repeat(np.arange(k), n_per)
    x = centres[y] + rng.normal(size=(len(y), dim))
    perm = rng.permutation(len(y))
    return x[perm].astype(np.float32), y[perm]


@pytest.fixture(scope="module")
def fitted():
    x, y = groups(120)
    return fit_head(x[:500], ClusterConfig()), x, y


def test_fit_recovers_known_groups(fitted):
    model, x, y = fitted
    ari = adjusted_rand_score(y[:500], model.labels)
    print(f"ARI of the batch fit against the planted groups: {ari:.3f} ({model.n_clusters} clusters)")
    assert ari > 0.9 and model.n_clusters == 5  # chance is ~0
    assert model.embedding.shape == (500, 8)


@pytest.mark.parametrize("assigner", ["knn", "hdbscan"])
def test_assignment_of_held_out_points_agrees_with_batch_labels(assigner):
    x, y = groups(120, seed=1)
    model = fit_head(x[:500], ClusterConfig(assigner=assigner))
    labels, strength = model.predict_many(x[500:])
    # map fitted cluster ids to planted groups through the batch labels
    mapping = {c: np.bincount(y[:500][model.labels == c]).argmax() for c in set(model.labels.tolist()) - {-1}}
    agree = np.mean([mapping.get(int(c), -1) == t for c, t in zip(labels, y[500:], strict=True)])
    assert agree > 0.9, agree
    assert np.all((strength >= 0) & (strength <= 1))


def test_duplicates_are_jittered():
    x = np.ones((30, 4), dtype=np.float32)
    j, n = jitter_duplicates(x, 1e-6)
    assert n == 29 and len(np.unique(j, axis=0)) == 30 and np.allclose(j, x, atol=1e-4)


def test_persisted_model_checks_its_checksum(fitted):
    import hashlib

    model = fitted[0]
    data = model.to_bytes()
    back = HeadModel.from_bytes(data, hashlib.sha256(data).hexdigest())
    assert np.array_equal(back.labels, model.labels)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        HeadModel.from_bytes(data, "0" * 64)


def test_river_style_predict_one_and_drift():
    x, _ = groups(20, k=3, seed=2)
    model = fit_head(x, ClusterConfig(min_cluster_size=10, min_samples=5))
    c, s = model.predict_one(x[0])
    assert isinstance(c, int) and 0 <= s <= 1
    mon = DriftMonitor()
    assert not any([mon.update(0) for _ in range(300)])
    assert any([mon.update(-1) for _ in range(300)])  # everything turns to noise: drift
    assert mon.noise_rate == 0.5


def test_pca_reduction_keeps_the_clusters_of_the_papers_exact_pipeline():
    """512-d input: our unit-normalise + PCA-64 path against UMAP(cosine) on the raw vectors."""
    x, y = groups(100, k=4, dim=512, seed=3)
    fast = fit_head(x, ClusterConfig(pca_components=64, n_epochs=100))
    exact = fit_head(x, ClusterConfig())  # the default is the paper's exact pipeline
    assert fast.pca is not None and exact.pca is None and fast.explained_variance > 0.5
    assert adjusted_rand_score(y, fast.labels) > 0.9
    assert adjusted_rand_score(exact.labels, fast.labels) > 0.9
    # new points go through the same normalisation and projection
    labels, _ = fast.predict_many(x[:20] * 3.0)  # cosine: scale must not matter
    assert np.mean(labels == fast.labels[:20]) > 0.9


def test_drift_treats_the_cluster_id_as_a_category_not_a_number():
    """Clusters 0 and 2 alternating, then cluster 1 alone: the mean id stays 1, the shares
    change completely. An ADWIN on the id as a number saw nothing."""
    mon = DriftMonitor(clusters=[0, 1, 2])
    assert not any([mon.update(c) for c in [0, 2] * 400])
    assert any([mon.update(1) for _ in range(400)])
    relabelled = DriftMonitor(clusters=[0, 1])  # a stable mix is not drift, whatever the ids
    assert not any([relabelled.update(c) for c in [0, 1, 1] * 400])


def test_embedding_vector_checks_dim_and_finiteness():
    from apmae.cluster import embedding_vector
    from apmae.codec import BadPattern

    v = np.arange(4, dtype="<f4")
    assert np.array_equal(embedding_vector(v.tobytes(), 4), v)
    with pytest.raises(BadPattern):
        embedding_vector(v.tobytes(), 5)
    with pytest.raises(BadPattern):
        embedding_vector(np.array([1, np.nan], dtype="<f4").tobytes(), 2)


def test_cluster_plan_fits_one_checkpoint_per_head_and_skips_small_heads():
    from apmae.cluster import plan_heads, same_space

    rows = [(f"e{i}", "m/0/0", "ck@200") for i in range(40)]
    rows += [(f"f{i}", "m/0/0", "ck@100") for i in range(30)]  # an older checkpoint: another space
    rows += [(f"g{i}", "m/0/1", "ck@200") for i in range(10)]
    rows += rows[:5]  # redelivered
    plan = plan_heads(rows, min_points=30)
    assert plan.checkpoint == "ck@200" and plan.heads == {"m/0/0": [f"e{i}" for i in range(40)]}
    assert plan.skipped == {"m/0/1": 10} and plan.other_checkpoints == 30 and plan.duplicates == 5
    old = plan_heads(rows, checkpoint="ck@100", min_points=30)
    assert old.heads == {"m/0/0": [f"f{i}" for i in range(30)]}
    assert same_space("ck@200", "ck@200") and not same_space("ck@100", "ck@200") and same_space("x", "")


def test_mean_pairwise_cosine_matches_the_pairs_and_is_recorded_per_fit(fitted):
    from apmae.cluster import mean_pairwise_cosine

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)) + 2.0
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    brute = (u @ u.T)[~np.eye(50, dtype=bool)].mean()
    assert abs(mean_pairwise_cosine(x) - brute) < 1e-9
    assert abs(mean_pairwise_cosine(np.ones((10, 4)) * 3) - 1) < 1e-9  # one vector: nothing to cluster
    assert abs(mean_pairwise_cosine(np.eye(6))) < 1e-12
    assert -1 <= fitted[0].mean_cosine <= 1
