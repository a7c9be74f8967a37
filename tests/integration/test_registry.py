"""The registry on a real Redis: whole-entry replacement, history, latest, verified reads."""

from __future__ import annotations

import uuid

import pytest

from services.registry import ArtifactStore, Registry, RegistryError

pytestmark = pytest.mark.integration


@pytest.fixture
def registry(redis_client) -> Registry:
    return Registry(redis_client, f"r{uuid.uuid4().hex[:8]}.", keep=3)


def test_a_put_replaces_the_entry_whole_and_keeps_a_bounded_history(registry):
    registry.put("cluster", "m/0/1", path="a", sha256="1", version="v1", checkpoint="c1")
    registry.put("cluster", "m/0/1", path="b", sha256="2", version="v2")  # no checkpoint field this time
    assert registry.latest("cluster", "m/0/1") == {"path": "b", "sha256": "2", "version": "v2"}
    assert [e["version"] for e in registry.history("cluster", "m/0/1")] == ["v2", "v1"]
    for v in range(3, 6):
        registry.put("cluster", "m/0/1", path="p", sha256=str(v), version=f"v{v}")
    assert [e["version"] for e in registry.history("cluster", "m/0/1")] == ["v5", "v4", "v3"]  # keep = 3
    assert registry.names("cluster") == ["m/0/1"]
    with pytest.raises(RegistryError, match="no cluster named 'm/0/2'"):
        registry.latest("cluster", "m/0/2")


def test_verify_returns_bytes_only_when_they_match_the_entry(registry, tmp_path):
    store = ArtifactStore(tmp_path)
    sha = store.write("fits/h.pkl", b"fitted")
    registry.put("cluster", "h", path="fits/h.pkl", sha256=sha)
    assert registry.verify("cluster", "h", store) == (registry.get("cluster", "h"), b"fitted")
    store.write("fits/h.pkl", b"tampered")
    with pytest.raises(RegistryError, match="does not match its recorded SHA-256"):
        registry.verify("cluster", "h", store)
    registry.put("cluster", "gone", path="fits/gone.pkl", sha256=sha)
    with pytest.raises(RegistryError, match="missing"):
        registry.verify("cluster", "gone", store)
    # an AP-MAE entry points at a checkpoint directory; its weights are what the hash covers
    wsha = store.write("trainer/run/step-1/model.safetensors", b"weights")
    registry.put("apmae", "run", path="trainer/run/step-1", sha256=wsha, step=1)
    assert registry.verify("apmae", "run", store)[1] == b"weights"
