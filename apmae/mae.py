"""AP-MAE: a masked autoencoder for attention patterns (paper section 4, Table 1).

MAE (He et al.) with a few named differences, each a small piece below:

* ``log_scale``          patterns are log-normalised first (:func:`apmae.scaling.log_scale`);
* :func:`lower_patches`  only the lower-triangle patches exist: 36 of 64 for 256 / 32;
* :func:`pad_diagonal`   the diagonal patches' upper halves are padded with zeros, and
  :func:`masked_patch_loss` (per sample) ignores those padded pixels;
* the decoder receives the encoded visible tokens *at their own positions* and mask tokens
  elsewhere (the authors' code let mask tokens overwrite them, so the decoder saw the encoder
  only through CLS; ``test_decoder_uses_visible_encodings`` guards against that bug);
* ``embed`` is an unmasked pass over the 36 lower-triangle patches and returns the CLS
  output, the pattern's embedding for clustering (never the 64 patches training never saw).

Parameter count: Table 1 (encoder 24 x 512, MLP 2048; decoder 8 x 512, MLP 2048) gives
76.2M + 26.0M = 102M parameters. The paper's text calls 101M "the encoder" and 25M "the
decoder"; the architecture it tabulates makes 101M the whole model. We follow Table 1 and
assert these counts in the tests.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from apmae.scaling import log_scale


@dataclass(frozen=True)
class APMAEConfig:
    pattern_size: int = 256
    patch_size: int = 32
    mask_ratio: float = 0.5
    enc_dim: int = 512
    enc_depth: int = 24
    enc_heads: int = 16
    enc_mlp: int = 2048
    dec_dim: int = 512
    dec_depth: int = 8
    dec_heads: int = 8
    dec_mlp: int = 2048
    log_scale: bool = True

    def __post_init__(self):
        assert self.pattern_size % self.patch_size == 0, (
            f"pattern size {self.pattern_size} must be divisible by the patch size {self.patch_size}")
        assert self.enc_dim % self.enc_heads == 0 and self.dec_dim % self.dec_heads == 0, "dims must split into heads"
        assert 0 <= self.mask_ratio < 1, f"mask ratio {self.mask_ratio} must be in [0, 1)"

    @property
    def grid(self) -> int:
        return self.pattern_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * (self.grid + 1) // 2


# -- the paper's steps, as functions (section 4.1) --------------------------------------------
def lower_patches(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """x: (N, S, S) -> (N, P, p*p), the patches on or below the diagonal, row-major
    (P = g (g + 1) / 2 for a g x g grid: 36 of 64 at S = 256, p = 32). The patches above the
    diagonal are all zeros in a causal pattern and never exist for AP-MAE."""
    n, s = x.shape[0], x.shape[-1]
    g = s // patch_size
    rows, cols = torch.tril_indices(g, g, device=x.device)
    grid = x.reshape(n, g, patch_size, g, patch_size).permute(0, 1, 3, 2, 4)  # (N, g, g, p, p)
    return grid[:, rows, cols].reshape(n, -1, patch_size * patch_size)


def packed_patch_index(size: int, patch_size: int) -> torch.Tensor:
    """(P * p*p,) long: where each pixel of the lower patches sits in a packed lower triangle
    of an (S, S) pattern (``apmae.codec``'s wire order, row-major), and ``S (S + 1) / 2`` (one
    past the end: a zero the caller appends) for the diagonal patches' upper halves. A gather
    with it is :func:`lower_patches` then :func:`pad_diagonal`, without the square."""
    length = size * (size + 1) // 2
    square = torch.full((1, size, size), length, dtype=torch.long)
    rows, cols = torch.tril_indices(size, size)
    square[0, rows, cols] = torch.arange(length)
    return lower_patches(square, patch_size).flatten()


def diagonal_valid(grid: int, patch_size: int) -> torch.Tensor:
    """(P, p*p) 1 where a pixel of a lower patch is real, 0 on the diagonal patches' upper
    halves (the pixels :func:`pad_diagonal` pads)."""
    rows, cols = torch.tril_indices(grid, grid)
    valid = torch.ones(len(rows), patch_size, patch_size)
    valid[rows == cols] = torch.ones(patch_size, patch_size).tril()
    return valid.flatten(1)


def pad_diagonal(patches: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """patches: (N, P, p*p) -> the same with the diagonal patches' upper halves set to zero.
    valid: (P, p*p) from :func:`diagonal_valid`."""
    return patches * valid


def masked_patch_loss(target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                      valid: torch.Tensor) -> torch.Tensor:
    """The reconstruction loss per sample: MSE over the valid pixels of the masked patches.

    target, pred: (N, P, p*p); mask: (N, P), 1 = masked; valid: (P, p*p). Returns (N,).
    No per-patch target normalisation (unlike MAE's ``norm_pix_loss``): the log-scaled
    pattern is already in [0, 1]."""
    per_patch = ((pred - target) ** 2 * valid).sum(-1) / valid.sum(-1)  # (N, P)
    return (per_patch * mask).sum(1) / mask.sum(1).clamp_min(1)


# Named sizes (timm-style registry): the paper's, and small ones that train on a CPU.
VARIANTS: dict[str, APMAEConfig] = {
    "paper": APMAEConfig(),
    "base": APMAEConfig(enc_depth=12, dec_depth=4),
    "small": APMAEConfig(enc_dim=128, enc_depth=4, enc_heads=4, enc_mlp=512,
                         dec_dim=128, dec_depth=2, dec_heads=4, dec_mlp=512),
    "tiny": APMAEConfig(enc_dim=64, enc_depth=2, enc_heads=2, enc_mlp=128,
                        dec_dim=64, dec_depth=1, dec_heads=2, dec_mlp=128),
}


def variant(name: str, **overrides) -> APMAEConfig:
    if name not in VARIANTS:
        raise KeyError(f"unknown AP-MAE variant {name!r}; known: {sorted(VARIANTS)}")
    return dataclasses.replace(VARIANTS[name], **overrides)


class Block(nn.Module):
    """Pre-norm transformer block (ViT): x + attn(ln(x)), x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, h, N, d/h)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class APMAE(nn.Module):
    def __init__(self, cfg: APMAEConfig):
        super().__init__()
        self.cfg = cfg
        p, g = cfg.patch_size, cfg.grid
        rows, cols = torch.tril_indices(g, g)  # the 36 lower-triangle patch positions, row-major
        self.register_buffer("patch_rows", rows, persistent=False)
        self.register_buffer("patch_cols", cols, persistent=False)
        self.register_buffer("pixel_valid", diagonal_valid(g, p), persistent=False)  # (P, p*p)
        self.register_buffer("packed_index", packed_patch_index(cfg.pattern_size, p), persistent=False)
        n = cfg.num_patches
        # encoder
        self.patch_norm = nn.LayerNorm(p * p, eps=1e-6)
        self.patch_embed = nn.Linear(p * p, cfg.enc_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.enc_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, cfg.enc_dim))
        self.blocks = nn.ModuleList(Block(cfg.enc_dim, cfg.enc_heads, cfg.enc_mlp) for _ in range(cfg.enc_depth))
        self.norm = nn.LayerNorm(cfg.enc_dim, eps=1e-6)
        # decoder
        self.decoder_embed = nn.Linear(cfg.enc_dim, cfg.dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dec_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, cfg.dec_dim))
        self.decoder_blocks = nn.ModuleList(Block(cfg.dec_dim, cfg.dec_heads, cfg.dec_mlp)
                                            for _ in range(cfg.dec_depth))
        self.decoder_norm = nn.LayerNorm(cfg.dec_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(cfg.dec_dim, p * p)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for t in (self.cls_token, self.mask_token, self.pos_embed, self.decoder_pos_embed):
            nn.init.normal_(t, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- the AP-MAE differences -------------------------------------------------------------
    def preprocess(self, patterns: torch.Tensor) -> torch.Tensor:
        """patterns: (N, S, S) raw probabilities (or (N, 1, L) packed triangles, :meth:`patches`)
        -> the same shape, float32, log-scaled unless ablated."""
        return log_scale(patterns) if self.cfg.log_scale else patterns.float()

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, S, S) -> (N, P, p*p): only the lower-triangle patches, diagonal ones padded."""
        return pad_diagonal(lower_patches(x, self.cfg.patch_size), self.pixel_valid)

    def patches(self, patterns: torch.Tensor) -> torch.Tensor:
        """The model's input: (N, P, p*p) preprocessed lower patches, from (N, S, S) patterns or
        from (N, S (S + 1) / 2) packed lower triangles (the wire's layout, ``apmae.codec``).

        For a causal square (zeros above the diagonal) both give the same values, bit for bit.
        The packed way never builds the square: the log scaling runs on the triangle only (an
        (N, 1, L) "pattern" has the same positives and minimum) and one gather lays out the
        patches (the encoder's and trainer's way; ``raw_square`` in benchmarks/encoder.py
        times the other)."""
        if patterns.dim() == 3:
            return self.patchify(self.preprocess(patterns))
        s = self.cfg.pattern_size
        if patterns.dim() != 2 or patterns.shape[-1] != s * (s + 1) // 2:
            raise ValueError(f"patterns of shape {tuple(patterns.shape)}: expected (N, {s}, {s}) or packed "
                             f"(N, {s * (s + 1) // 2})")
        scaled = self.preprocess(patterns.unsqueeze(1)).squeeze(1)  # (N, L)
        n = scaled.shape[0]  # not len(): a traced or exported graph then keeps N a variable
        scaled = torch.cat([scaled, scaled.new_zeros(n, 1)], dim=1)  # the padding zero at L
        return scaled[:, self.packed_index].view(n, self.cfg.num_patches, -1)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, P, p*p) -> (N, S, S) with zeros in the upper-triangle patches."""
        n, p, g = patches.shape[0], self.cfg.patch_size, self.cfg.grid
        grid = patches.new_zeros(n, g, g, p, p)
        grid[:, self.patch_rows, self.patch_cols] = (patches * self.pixel_valid).reshape(n, -1, p, p)
        return grid.permute(0, 1, 3, 2, 4).reshape(n, g * p, g * p)

    # -- MAE ----------------------------------------------------------------------------------
    def random_masking(self, x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None):
        """Per-sample random masking by argsort of noise.

        x: (N, P, D). Returns x_visible (N, K, D), mask (N, P) with 1 = masked, ids_restore (N, P).
        """
        n, length, d = x.shape
        keep = int(length * (1 - mask_ratio))
        noise = torch.rand(n, length, device=x.device, generator=generator)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        return x_visible, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, patches: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None):
        """patches: (N, P, p*p) -> latent (N, 1+K, D_enc), mask (N, P), ids_restore (N, P)."""
        x = self.patch_embed(self.patch_norm(patches)) + self.pos_embed[:, 1:]
        if mask_ratio > 0:
            x, mask, ids_restore = self.random_masking(x, mask_ratio, generator)
        else:  # embedding: every patch, in order, so the same pattern always gives the same vector
            n, length = x.shape[:2]
            mask = x.new_zeros(n, length)
            ids_restore = torch.arange(length, device=x.device).expand(n, -1)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent: (N, 1+K, D_enc) -> pred (N, P, p*p).

        Visible encodings are placed back at their own positions (unshuffled with
        ids_restore) next to mask tokens at the masked ones, as in MAE.
        """
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        body = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (N, P, D_dec): visible first, then masks
        body = torch.gather(body, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1], body], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The batch's loss: the mean of :func:`masked_patch_loss` over its samples (every
        sample has the same number of masked patches, so this is also the mean over them).

        target, pred: (N, P, p*p); mask: (N, P), 1 = masked. Returns a scalar.
        """
        return masked_patch_loss(target, pred, mask, self.pixel_valid).mean()

    def forward(self, patterns: torch.Tensor, mask_ratio: float | None = None,
                generator: torch.Generator | None = None):
        """patterns: (N, S, S) raw attention probabilities, or (N, S (S + 1) / 2) packed
        (:meth:`patches`) -> (loss, pred (N, P, p*p), mask (N, P))."""
        target = self.patches(patterns)
        latent, mask, ids_restore = self.forward_encoder(
            target, self.cfg.mask_ratio if mask_ratio is None else mask_ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(target, pred, mask), pred, mask

    @torch.no_grad()
    def embed(self, patterns: torch.Tensor) -> torch.Tensor:
        """(N, S, S) or packed (N, S (S + 1) / 2) -> (N, D_enc): CLS output of an unmasked pass
        over the lower-triangle patches."""
        latent, _, _ = self.forward_encoder(self.patches(patterns), 0.0)
        return latent[:, 0]

    def num_params(self) -> tuple[int, int]:
        """(encoder, decoder) parameter counts."""
        dec = sum(p.numel() for n, p in self.named_parameters() if n.startswith(("decoder", "mask_token")))
        return sum(p.numel() for p in self.parameters()) - dec, dec


# -- artifacts shaped like Hugging Face models ------------------------------------------------
MODEL_TYPE = "apmae"
WEIGHTS, CONFIG, TRAINER_STATE, CARD = "model.safetensors", "config.json", "trainer_state.json", "README.md"


def save_pretrained(model: APMAE, directory: Path, trainer_state: dict | None = None) -> Path:
    """Write a checkpoint the way Hugging Face models are laid out.

    ``model.safetensors`` (weights), ``config.json`` (flat: ``model_type``, ``architectures``
    and the :class:`APMAEConfig` fields, nothing else), ``trainer_state.json`` (how it was
    trained: step, loss, the topic and the offsets it read, the resolved training config) and
    ``README.md``, a model card generated from the two. ``huggingface_hub.upload_folder`` can
    publish the directory as is; :func:`from_pretrained` reads it back from disk or the hub.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, directory / WEIGHTS, metadata={"format": "pt"})
    config = {"model_type": MODEL_TYPE, "architectures": ["APMAE"], **dataclasses.asdict(model.cfg)}
    (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    trainer_state = trainer_state or {}
    (directory / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True, default=str))
    (directory / CARD).write_text(model_card(model, trainer_state))
    return directory


def model_card(model: APMAE, trainer_state: dict) -> str:
    """The checkpoint's README.md: what it is, what it was trained on, its loss."""
    cfg, (enc, dec) = model.cfg, model.num_params()
    offsets = trainer_state.get("offsets") or {}
    train = trainer_state.get("train") or {}
    train = train.get("train", train)  # the recipe, nested in the trainer's config (flat before)
    loss = trainer_state.get("loss")
    lines = [
        "---", "library_name: apmae", "license: apache-2.0", "tags: [attention-patterns, masked-autoencoder, ap-mae]",
        "---", "", f"# AP-MAE ({enc / 1e6:.1f}M encoder + {dec / 1e6:.1f}M decoder parameters)", "",
        "A masked autoencoder for the attention patterns of code LLMs (AP-MAE, sections 4-4.2 of "
        "*Attention Pattern Discovery at Scale*), trained by apmae on patterns streamed from "
        "Kafka.", "",
        f"- patterns: {cfg.pattern_size} x {cfg.pattern_size}, patches of {cfg.patch_size} "
        f"({cfg.num_patches} lower-triangle patches), mask ratio {cfg.mask_ratio}, "
        f"log scaling {'on' if cfg.log_scale else 'off (ablation)'}",
        f"- encoder {cfg.enc_depth} x {cfg.enc_dim}, decoder {cfg.dec_depth} x {cfg.dec_dim}",
        f"- trained for {trainer_state.get('step', '?')} steps of {train.get('batch_size', '?')} patterns, "
        f"learning rate {train.get('lr', '?')}",
        f"- data: topic `{trainer_state.get('topic', '?')}`, {len(offsets)} partitions, "
        f"{sum(int(o) for o in offsets.values())} messages read (the offsets are in trainer_state.json)",
        f"- last training loss (masked-patch MSE on log-scaled patterns): "
        f"{'n/a' if loss is None else f'{float(loss):.4g}'}",
        "", "Its reconstruction loss against the mean-patch baseline on held-out samples is what "
        "`apmae eval` and `apmae study` report; the training loss above is in sample.", "",
        "```python", "from apmae.mae import from_pretrained", "model, state = from_pretrained(\"<this directory or hub id>\")",
        "embeddings = model.embed(patterns)  # (N, 256, 256) probabilities -> (N, 512) CLS", "```", "",
    ]
    return "\n".join(lines)


def is_hub_id(name: str | Path) -> bool:
    """``org/name`` (not an existing path): a model on the Hugging Face hub."""
    return not Path(name).exists() and str(name).count("/") == 1 and not str(name).startswith((".", "/"))


def resolve_pretrained(name_or_path: str | Path, revision: str | None = None, cache_dir: Path | None = None) -> Path:
    """The local directory of a checkpoint: the directory itself, or a hub id's snapshot."""
    directory = Path(name_or_path)
    if (directory / WEIGHTS).exists():
        return directory
    if not is_hub_id(name_or_path):
        raise FileNotFoundError(f"{name_or_path}: no {WEIGHTS} there, and not a hub id (org/name)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), revision=revision, cache_dir=cache_dir,
                                  allow_patterns=[WEIGHTS, CONFIG, TRAINER_STATE, CARD]))


def from_pretrained(name_or_path: str | Path, device: str = "cpu", revision: str | None = None,
                    cache_dir: Path | None = None) -> tuple[APMAE, dict]:
    """(model in eval mode, its trainer state) from a checkpoint directory or a hub id.

    A hub id (``org/name``) is fetched with ``huggingface_hub.snapshot_download`` (its four
    files only); a directory written before this layout (``config.json`` holding
    ``{"apmae": {...}, "step": ...}``) still loads.
    """
    from safetensors.torch import load_file

    directory = resolve_pretrained(name_or_path, revision, cache_dir)
    config = json.loads((directory / CONFIG).read_text())
    if "apmae" in config:  # the earlier layout: config and training state in one file
        fields, state = config["apmae"], {k: v for k, v in config.items() if k != "apmae"}
    else:
        if config.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{directory}: model_type {config.get('model_type')!r} is not {MODEL_TYPE!r}")
        known = {f.name for f in dataclasses.fields(APMAEConfig)}
        fields = {k: v for k, v in config.items() if k in known}
        path = directory / TRAINER_STATE
        state = json.loads(path.read_text()) if path.exists() else {}
    model = APMAE(APMAEConfig(**fields))
    model.load_state_dict(load_file(directory / WEIGHTS, device=device))
    return model.to(device).eval(), state
