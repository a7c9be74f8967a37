"""GPU rates for the paper-scale projection: StarCoder2-shaped producers and AP-MAE on one GPU.

No StarCoder2 checkpoint can be downloaded here, so each target model is built from its
published configuration (3B / 7B / 15B: layers, heads, KV heads, widths) with random weights
in bfloat16: the same arithmetic, hence the same speed, as the trained model. Per model:

  sdpa      forward of a batch of 256-token inputs, no capture (the floor)
  capture   our capture of every head (apmae.capture), the patterns left on the GPU
  capture+encode  the same, plus the producer's encoding of every pattern to wire bytes
            on the host (apmae.codec.encode_many): what a GPU producer does before publishing;
            with the reused pinned staging buffer (default) and, in the same run, the earlier
            pageable copy (``pinned=False``)

and for AP-MAE (the paper variant): embedding (the encoder service) and a training step.

    python benchmarks/gpu.py [--batch 16] [--iters 5] [--out benchmarks/results/gpu.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SC2 = {  # the published StarCoder2 configurations (config.json of bigcode/starcoder2-{3b,7b,15b})
    "sc2-3b": dict(hidden_size=3072, num_hidden_layers=30, num_attention_heads=24, num_key_value_heads=2,
                   intermediate_size=12288),
    "sc2-7b": dict(hidden_size=4608, num_hidden_layers=32, num_attention_heads=36, num_key_value_heads=4,
                   intermediate_size=18432),
    "sc2-15b": dict(hidden_size=6144, num_hidden_layers=40, num_attention_heads=48, num_key_value_heads=4,
                    intermediate_size=24576),
}


def timed(fn, iters: int) -> float:
    fn()  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def producer_rates(name: str, batch: int, iters: int) -> dict:
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    from apmae.capture import install
    from apmae.codec import encode_many

    cfg = Starcoder2Config(vocab_size=49152, max_position_embeddings=16384, **SC2[name])
    with torch.device("cuda"):
        model = Starcoder2ForCausalLM(cfg).to(torch.bfloat16).eval()
    cap = install(model)
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    ids = torch.randint(0, cfg.vocab_size, (batch, 256), device="cuda")
    every = {layer: torch.arange(heads, device="cuda").expand(batch, -1) for layer in range(layers)}

    @torch.inference_mode()
    def sdpa():
        cap.clear()
        model(input_ids=ids, use_cache=False, logits_to_keep=1).logits.argmax(-1).cpu()

    @torch.inference_mode()
    def capture_only():
        cap.clear()
        cap.select.update(every)
        model(input_ids=ids, use_cache=False, logits_to_keep=1).logits.argmax(-1).cpu()
        cap.clear()

    @torch.inference_mode()
    def capture_and_encode(pinned: bool = True):
        cap.clear()
        cap.select.update(every)
        model(input_ids=ids, use_cache=False, logits_to_keep=1).logits.argmax(-1).cpu()
        nbytes = 0
        for layer in range(layers):  # what the producer does per layer: (B*H, n, n) -> wire bytes
            payloads, _ = encode_many(cap.captured[layer].reshape(-1, 256, 256), pinned=pinned)
            nbytes += sum(len(p) for p in payloads)
        cap.clear()
        return nbytes

    t_sdpa = timed(sdpa, iters)
    t_capture = timed(capture_only, iters)
    t_pageable = timed(lambda: capture_and_encode(pinned=False), iters)  # the earlier host copy, same run
    t_cap = timed(capture_and_encode, iters)
    wire = capture_and_encode()
    return {"model": name, "heads": layers * heads, "batch": batch,
            "sdpa_samples_s": batch / t_sdpa, "capture_samples_s": batch / t_capture,
            "capture_encode_pageable_samples_s": batch / t_pageable,
            "capture_encode_samples_s": batch / t_cap,
            "capture_vs_sdpa": t_cap / t_sdpa, "patterns_s": batch * layers * heads / t_cap,
            "wire_MB_per_sample": wire / batch / 1e6, "wire_MB_s": wire / t_cap / 1e6}


def apmae_rates(iters: int) -> list[dict]:
    from apmae.mae import APMAE, variant
    from apmae.train import make_optimizer, train_step

    torch.manual_seed(0)
    model = APMAE(variant("paper")).cuda()
    x = torch.rand(256, 256, 256, device="cuda").tril()
    x = x / x.sum(-1, keepdim=True)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        model.eval()

        @torch.inference_mode()
        def embed(dtype=dtype):
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                model.embed(x).float().cpu()

        t = timed(embed, iters)
        out.append({"stage": "encoder embed", "dtype": str(dtype).split(".")[-1], "batch": 256,
                    "patterns_s": 256 / t})
    model.train()
    opt = make_optimizer(model, 1e-4)
    xb = x[:60]
    for dtype in (torch.float32, torch.bfloat16):
        def step(dtype=dtype):
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                train_step(model, opt, xb, 1e-4)

        t = timed(step, iters)
        out.append({"stage": "trainer step", "dtype": str(dtype).split(".")[-1], "batch": 60, "patterns_s": 60 / t})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--models", default="sc2-3b,sc2-7b,sc2-15b")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU")
    rows = []
    for m in args.models.split(","):
        rows.append(producer_rates(m, args.batch, args.iters))
        torch.cuda.empty_cache()
    for r in rows:
        print(json.dumps(r))
    ap_rows = apmae_rates(args.iters)
    for r in ap_rows:
        print(json.dumps(r))
    res = {"benchmark": "gpu", "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "producer": rows, "apmae": ap_rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
