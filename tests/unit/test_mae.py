"""AP-MAE: patches, padding, masking, loss, the decoder bug the authors had, overfitting, I/O."""

from __future__ import annotations

import pytest
import torch

from apmae.mae import APMAE, VARIANTS, from_pretrained, save_pretrained, variant


def causal_patterns(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, size, size, generator=g) * 3
    logits = logits.masked_fill(torch.ones(size, size, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(logits, -1)


def small(size=64, patch=16, **kw) -> APMAE:
    return APMAE(variant("tiny", pattern_size=size, patch_size=patch, **kw))


def test_patch_selection_and_diagonal_padding_on_a_hand_made_pattern():
    m = small(size=8, patch=4, log_scale=False)  # grid 2x2 -> 3 lower patches
    x = torch.arange(64, dtype=torch.float32).reshape(1, 8, 8)  # upper triangle deliberately non-zero
    p = m.patchify(x)
    assert p.shape == (1, 3, 16)
    top_left, bottom_left, bottom_right = p[0].reshape(3, 4, 4)
    assert torch.equal(top_left, x[0, :4, :4].tril())  # diagonal patch: upper half padded with zeros
    assert torch.equal(bottom_left, x[0, 4:, :4])  # below the diagonal: untouched
    assert torch.equal(bottom_right, x[0, 4:, 4:].tril())
    back = m.unpatchify(p)[0]
    assert torch.equal(back, x[0].tril()) and back[:4, 4:].abs().sum() == 0  # upper-right patch never exists


def test_paper_variant_sizes():
    m = APMAE(VARIANTS["paper"])
    enc, dec = m.num_params()
    assert m.cfg.num_patches == 36
    assert 75e6 < enc < 77e6 and 25e6 < dec < 27e6  # Table 1: 101M in all (the paper says "101M + 25M")
    assert 100e6 < enc + dec < 104e6


@pytest.mark.parametrize("name", sorted(set(VARIANTS) - {"paper", "base"}))
def test_every_cpu_variant_runs_forward_and_embed(name):
    m = APMAE(variant(name, pattern_size=64, patch_size=16))
    loss, pred, mask = m(causal_patterns(2))
    assert torch.isfinite(loss) and pred.shape == (2, 10, 256) and mask.sum() == 2 * 5
    assert m.embed(causal_patterns(3)).shape == (3, m.cfg.enc_dim)


def test_loss_only_counts_masked_patches():
    m = small()
    x = causal_patterns(2)
    target = m.patchify(m.preprocess(x))
    mask = torch.zeros(2, 10)
    mask[:, :3] = 1
    pred = target.clone()
    pred[:, 5:] += 10.0  # wrong everywhere that is visible: must not count
    assert m.forward_loss(target, pred, mask).item() == 0.0
    pred[:, 0] += 1.0  # wrong in a masked patch: counts
    assert m.forward_loss(target, pred, mask).item() > 0.0


def test_padding_pixels_do_not_count():
    m = small()
    target = m.patchify(m.preprocess(causal_patterns(1)))
    pred = target.clone() + (1 - m.pixel_valid) * 5.0  # garbage only in the padded upper halves
    assert m.forward_loss(target, pred, torch.ones(1, 10)).item() == 0.0


def test_decoder_uses_visible_encodings():
    """The authors' decoder overwrote the visible tokens with mask tokens: changing the visible
    encodings (CLS kept) then changed nothing. Ours must see them."""
    torch.manual_seed(0)
    m = small().eval()
    x = causal_patterns(2)
    target = m.patchify(m.preprocess(x))
    g = torch.Generator().manual_seed(1)
    latent, mask, ids_restore = m.forward_encoder(target, 0.5, g)
    base = m.forward_loss(target, m.forward_decoder(latent, ids_restore), mask)
    changed = latent.clone()
    changed[:, 1:] += torch.randn_like(changed[:, 1:])  # visible tokens only; CLS untouched
    moved = m.forward_loss(target, m.forward_decoder(changed, ids_restore), mask)
    assert abs(moved.item() - base.item()) > 1e-4


def test_a_small_model_overfits_a_handful_of_patterns():
    torch.manual_seed(0)
    m = small()
    x = causal_patterns(4, seed=3)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for step in range(300):
        g.manual_seed(step % 4)  # a few fixed masks, so the task is memorisable
        loss, _, _ = m(x, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first / 10, (first, loss.item())


def test_log_scaling_ablation_switch():
    x = causal_patterns(1)
    assert torch.equal(small(log_scale=False).preprocess(x), x)
    s = small().preprocess(x)
    assert s.max() == 1.0 and s.min() == 0.0 and not torch.equal(s, x)


def test_save_load_round_trip_in_the_hugging_face_layout(tmp_path):
    import json

    m = small().eval()
    state = {"train": {"lr": 1e-3, "batch_size": 32}, "step": 7, "loss": 0.0123, "topic": "patterns.train",
             "offsets": {"0": 40, "1": 2}}
    save_pretrained(m, tmp_path / "ckpt", state)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors", "trainer_state.json"]
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "apmae" and config["pattern_size"] == 64  # flat, no training state
    assert "offsets" not in config and "train" not in config
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert "7 steps of 32 patterns" in card and "0.0123" in card and "42 messages read" in card
    back, meta = from_pretrained(tmp_path / "ckpt")
    x = causal_patterns(2)
    assert torch.equal(back.embed(x), m.embed(x))
    assert meta == state
    with pytest.raises(FileNotFoundError, match="not a hub id"):
        from_pretrained(tmp_path / "nowhere" / "deeper")


def test_checkpoints_of_the_earlier_layout_still_load(tmp_path):
    import dataclasses
    import json

    from safetensors.torch import save_file

    m = small().eval()
    (tmp_path / "old").mkdir()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, tmp_path / "old" / "model.safetensors")
    (tmp_path / "old" / "config.json").write_text(json.dumps({"apmae": dataclasses.asdict(m.cfg), "step": 3}))
    back, meta = from_pretrained(tmp_path / "old")
    assert meta["step"] == 3 and torch.equal(back.embed(causal_patterns(1)), m.embed(causal_patterns(1)))


def test_sizes_not_divisible_are_rejected():
    with pytest.raises(AssertionError, match="divisible"):
        variant("tiny", pattern_size=100, patch_size=32)


def test_non_finite_loss_stops_training_with_a_clear_message():
    from apmae.train import NonFiniteLoss, make_optimizer, train_step

    m = small()
    with torch.no_grad():
        m.decoder_pred.weight.fill_(float("nan"))
    opt = make_optimizer(m, 1e-3)
    before = m.patch_embed.weight.clone()
    with pytest.raises(NonFiniteLoss, match="loss is nan"):
        train_step(m, opt, causal_patterns(2), 1e-3)
    assert torch.equal(m.patch_embed.weight, before)  # no step was taken


def test_schedule_scaling_and_cosine():
    from apmae.train import Schedule, scaled_lr

    assert abs(scaled_lr(480) - 1.44e-3) < 1e-12  # the paper's batch 480 -> 1.44e-3
    s = Schedule(1.0, total_steps=100, warmup_steps=10)
    assert s.at(0) == 0.1 and s.at(9) == 1.0 and abs(s.at(55) - 0.5) < 1e-9 and s.at(100) == 0.0


def test_evaluation_baseline_cross_table_and_figure(tmp_path):
    from apmae import evaluate as E

    torch.manual_seed(0)
    m = small()
    x = causal_patterns(6, seed=5)
    losses = E.reconstruction_losses(m, x, seed=1)
    assert losses.shape == (6,) and torch.allclose(losses, E.reconstruction_losses(m, x, seed=1))
    base = E.mean_patch_losses(m, x, x, seed=1)
    assert base.shape == (6,) and torch.all(base >= 0)
    table = E.cross_evaluation({"a": m, "b": small()}, {"m1": x, "m2": causal_patterns(3, seed=9)})
    assert set(table) == {"a", "b"} and set(table["a"]) == {"m1", "m2"} and table["a"]["m2"]["n"] == 3
    assert "trained \\ evaluated" in E.format_table(table)
    png = E.figure1(m, x[0], tmp_path / "fig1.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_the_papers_patching_steps_by_name():
    """lower_patches keeps the g(g+1)/2 patches on or below the diagonal, pad_diagonal zeroes
    the diagonal patches' upper halves, and the model's patchify is exactly the two."""
    from apmae.mae import diagonal_valid, lower_patches, pad_diagonal

    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 8, 8)
    patches = lower_patches(x, 4)  # a 2 x 2 grid: (0,0), (1,0), (1,1)
    assert patches.shape == (2, 3, 16)
    assert torch.equal(patches[0, 1].reshape(4, 4), x[0, 4:, :4])  # row-major: (1, 0) second
    padded = pad_diagonal(patches, diagonal_valid(2, 4))
    assert torch.equal(padded[0, 2].reshape(4, 4), x[0, 4:, 4:].tril()) and torch.equal(padded[:, 1], patches[:, 1])
    m = APMAE(variant("tiny", pattern_size=8, patch_size=4))
    assert torch.equal(m.patchify(x), padded)


def test_the_loss_per_sample_averages_to_the_batch_loss():
    from apmae.mae import masked_patch_loss

    m = APMAE(variant("tiny", pattern_size=64, patch_size=16))
    x = causal_patterns(3)
    target = m.patchify(m.preprocess(x))
    latent, mask, ids = m.forward_encoder(target, 0.5, torch.Generator().manual_seed(0))
    pred = m.forward_decoder(latent, ids)
    per_sample = masked_patch_loss(target, pred, mask, m.pixel_valid)
    assert per_sample.shape == (3,) and (per_sample > 0).all()
    assert torch.allclose(per_sample.mean(), m.forward_loss(target, pred, mask))
    # a perfect reconstruction of one sample's masked patches: that sample's loss alone is 0
    fixed = pred.clone()
    fixed[1] = target[1]
    assert masked_patch_loss(target, fixed, mask, m.pixel_valid)[1] == 0 and masked_patch_loss(target, fixed, mask,
                                                                                               m.pixel_valid)[0] > 0


def test_a_hub_id_is_fetched_as_a_snapshot_of_the_four_files(tmp_path, monkeypatch):
    """Nothing downloads in tests: snapshot_download is pointed at a local directory, and we
    check what it was asked for."""
    import huggingface_hub

    from apmae.mae import is_hub_id

    m = small().eval()
    save_pretrained(m, tmp_path / "snap", {"step": 1})
    asked = {}

    def fake_snapshot(repo_id, **kw):
        asked.update(kw, repo_id=repo_id)
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert is_hub_id("org/apmae-small") and not is_hub_id(str(tmp_path / "snap")) and not is_hub_id("demo")
    back, state = from_pretrained("org/apmae-small", revision="v1", cache_dir=tmp_path / "hub")
    assert asked["repo_id"] == "org/apmae-small" and asked["revision"] == "v1"
    assert sorted(asked["allow_patterns"]) == ["README.md", "config.json", "model.safetensors", "trainer_state.json"]
    assert state == {"step": 1} and torch.equal(back.embed(causal_patterns(1)), m.embed(causal_patterns(1)))


@pytest.mark.parametrize("log_scale", [True, False])
def test_packed_triangles_give_the_same_patches_loss_and_embedding_as_squares(log_scale):
    """The encoder and trainer feed the wire's packed lower triangles (no square is built);
    a researcher feeds (N, S, S). Same values either way, bit for bit."""
    from apmae.codec import decode_pattern, encode_pattern, packed_values, read_packed

    m = small(log_scale=log_scale).eval()
    x = causal_patterns(4)
    x[0, 40, 3] = 0.0  # an underflow inside the triangle: not a positive, scaled to 0
    x[1, 50, 7] = 1e-42  # a subnormal: clamped like every other tiny value
    wire = [encode_pattern(p.numpy()) for p in x]
    bits, kept, bad = read_packed(wire, 64)
    assert kept == [0, 1, 2, 3] and not bad
    packed = packed_values(bits)
    square = torch.stack([torch.from_numpy(decode_pattern(w, 64)) for w in wire])
    assert packed.shape == (4, 64 * 65 // 2)
    assert torch.equal(m.patches(packed), m.patches(square))
    assert torch.equal(m.patches(square), m.patchify(m.preprocess(square)))
    assert torch.equal(m.embed(packed), m.embed(square))
    loss_p, pred_p, mask_p = m(packed, generator=torch.Generator().manual_seed(1))
    loss_s, pred_s, mask_s = m(square, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loss_p, loss_s) and torch.equal(pred_p, pred_s) and torch.equal(mask_p, mask_s)
    with pytest.raises(ValueError, match="packed"):
        m.patches(packed[:, :-1])  # one value short: not a triangle of this model's size


def test_the_packed_embedding_exports_with_the_batch_size_a_variable():
    """``torch.export`` of ``embed`` on packed triangles with a dynamic batch dimension: the
    graph runs any batch size (the packed layout uses ``shape[0]``, which a trace keeps a
    variable, not ``len()``, which it bakes in) and gives eager's embeddings."""
    from torch.export import Dim, export

    class Embed(torch.nn.Module):
        def __init__(self, m: APMAE):
            super().__init__()
            self.m = m

        def forward(self, packed: torch.Tensor) -> torch.Tensor:
            return self.m.embed(packed)

    m = small().eval()
    packed = causal_patterns(7)[:, *torch.tril_indices(64, 64)]  # (7, 64 * 65 / 2) lower triangles
    with torch.no_grad():
        program = export(Embed(m), (packed[:4],), dynamic_shapes={"packed": {0: Dim("n", min=2, max=64)}},
                         strict=False)
    for n in (2, 3, 7):
        assert torch.allclose(program.module()(packed[:n]), m.embed(packed[:n]), atol=1e-5), n
    # the benchmarks' TorchScript copy, traced at 8 patterns, at 1 and 7
    from benchmarks._common import traced_embed

    traced = traced_embed(m)
    with torch.inference_mode():
        for n in (1, 7):
            assert torch.allclose(traced(packed[:n]), m.embed(packed[:n]), atol=1e-5), n
