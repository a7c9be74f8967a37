"""Metric hygiene: build info, bounded per-head series, series removed when a partition is revoked."""

from __future__ import annotations

from importlib.metadata import version

from kafka import TopicPartition
from prometheus_client import REGISTRY, Gauge

from services import metrics


def test_build_info_names_the_installed_version():
    samples = [s for m in REGISTRY.collect() if m.name == "apmae_build_info" for s in m.samples]
    assert len(samples) == 1 and samples[0].value == 1
    assert samples[0].labels["version"] == version("apmae")


def test_head_series_are_bounded_least_recently_updated_first():
    g = Gauge("apmae_test_head_value", "test", ["model", "layer", "head"], registry=None)
    heads = metrics.HeadSeries(g, limit=3)
    for h in range(3):
        assert heads.admit("m", 0, h)
        g.labels("m", "0", str(h)).set(h)
    assert heads.admit("m", 0, 0)  # head 0 is now the most recent
    assert heads.admit("m", 1, 7)  # a 4th head evicts head 1, the least recently updated
    g.labels("m", "1", "7").set(7)
    assert heads.heads() == [("m", "0", "2"), ("m", "0", "0"), ("m", "1", "7")]
    present = {(s.labels["layer"], s.labels["head"]) for s in next(iter(g.collect())).samples}
    assert present == {("0", "2"), ("0", "0"), ("1", "7")}
    off = metrics.HeadSeries(g, limit=0)  # opt-in: 0 exports none
    assert not off.admit("m", 0, 0)


def test_assigner_drops_the_series_of_partitions_it_lost(tmp_path):
    from apmae.config import BusConfig
    from services.cluster import CLUSTERS, HEAD_SERIES, NOISE, Assigner, ClusterServiceConfig

    cfg = ClusterServiceConfig(**{**vars(BusConfig(state_dir=tmp_path)), "head_metrics": 10})
    a = Assigner(cfg)
    for head, part in ((1, 0), (2, 1), (3, 1)):
        assert HEAD_SERIES.admit("rv", 4, head)
        NOISE.labels("rv", "4", str(head)).set(0.5)
        CLUSTERS.labels("rv", "4", str(head)).set(3)
        a.head_partition[("rv", "4", str(head))] = ("t.embeddings", part)
    # a rebalance hands partition 0 back and partition 1 to another member
    assert a.keep_heads_of([TopicPartition("t.embeddings", 0)]) == 2

    def value(metric, head):
        return REGISTRY.get_sample_value(metric, {"model": "rv", "layer": "4", "head": str(head)})

    assert value("apmae_cluster_noise_ratio", 1) == 0.5 and value("apmae_cluster_clusters", 1) == 3
    assert value("apmae_cluster_noise_ratio", 2) is None and value("apmae_cluster_clusters", 3) is None
    assert set(a.head_partition) == {("rv", "4", "1")}
