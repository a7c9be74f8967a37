"""Safe artifacts: checkpoints are safetensors, nothing unpickles unchecked, paths stay inside."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from services.registry import ArtifactStore, UnsafePath

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "apmae").rglob("*.py")) + sorted((ROOT / "services").rglob("*.py"))


def test_no_torch_load_without_weights_only_and_no_stray_unpickling():
    for path in SOURCES:
        text = path.read_text()
        for call in re.findall(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call, (path, call)
        for m in re.finditer(r"\b(pickle|joblib|dill|cloudpickle)\.loads?\(", text):
            # the one unpickling site: HeadModel.from_bytes, after the registry's SHA-256 matched
            assert path.name == "cluster.py" and "refusing to unpickle" in text, (path, m.group(0))


def test_model_checkpoints_are_safetensors(tmp_path):
    import torch

    from apmae.mae import APMAE, from_pretrained, save_pretrained, variant

    d = save_pretrained(APMAE(variant("tiny", pattern_size=64, patch_size=16)), tmp_path / "ck")
    assert (d / "model.safetensors").read_bytes()[8:9] == b"{"  # safetensors: u64 header length, JSON header
    assert not list(d.glob("*.bin")) and not list(d.glob("*.pt"))
    model, _ = from_pretrained(d)
    assert isinstance(model, torch.nn.Module)


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "/etc/passwd", "a/../../../root/.ssh/id_rsa"])
def test_the_artifact_store_refuses_paths_outside_it(tmp_path, rel):
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(UnsafePath):
        store.path(rel)
    with pytest.raises(UnsafePath):
        store.write(rel, b"x")


def test_a_tampered_artifact_is_refused(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    sha = store.write("clusters/v1/h.pkl", b"original")
    assert sha == hashlib.sha256(b"original").hexdigest()
    (tmp_path / "store" / "clusters/v1/h.pkl").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="SHA-256"):
        store.read("clusters/v1/h.pkl", sha)


def test_a_checkpoint_is_hashed_again_only_when_it_changed(tmp_path, monkeypatch):
    """The encoder checks a fixed checkpoint directory every few seconds: it hashed the whole
    file each time. Now a changed file (same size, new bytes) gets its new digest, an
    unchanged one is not read again."""
    import os

    from services import registry

    reads: list[Path] = []
    real = registry.sha256_file
    monkeypatch.setattr(registry, "sha256_file", lambda p: reads.append(p) or real(p))
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"a" * 4096)
    digest = registry.FileDigests()
    first = digest(f)
    assert digest(f) == first == hashlib.sha256(b"a" * 4096).hexdigest() and len(reads) == 1
    f.write_bytes(b"b" * 4096)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a coarse clock must not hide the write
    assert digest(f) == hashlib.sha256(b"b" * 4096).hexdigest() and len(reads) == 2
