"""The paper's log-scaling ablation on real patterns from the local default model.

Reads the training patterns the demo captured (``patterns.train`` under the demo's topic
prefix, on the running embedded broker), trains the same small AP-MAE twice for the same
steps, with and without log scaling, and scores each on held-out patterns against its own
mean-patch baseline (losses in scaled and raw units are not comparable; the ratio to the
baseline is). Writes Figure 1 for both.

    apmae demo          # first (leaves the broker running)
    python benchmarks/log_scaling.py [--steps 300]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._common import RESULTS, table, write_result  # noqa: E402


def main() -> None:
    from apmae import evaluate as E
    from apmae.codec import decode_pattern
    from apmae.config import BusConfig
    from apmae.mae import APMAE, variant
    from apmae.topics import PATTERNS_TRAIN
    from apmae.train import Schedule, make_optimizer, scaled_lr, train_step
    from services.bus import Bus, Message, read_range

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.0, help="peak learning rate (0: the paper's 1.5e-4 x batch / 50)")
    ap.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    ap.add_argument("--variant", default="small")
    ap.add_argument("--target-model", default="local:smollm2", help="whose patterns (the topic may hold several)")
    ap.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    ap.add_argument("--topic-prefix", default="demo.")
    args = ap.parse_args()
    bus = Bus(BusConfig(bootstrap_servers=args.bootstrap_servers, topic_prefix=args.topic_prefix), "ablation")
    pats = [decode_pattern(m.record.payload, m.record.size, m.record.dtype) for m in read_range(bus, PATTERNS_TRAIN)
            if isinstance(m, Message) and m.record.model == args.target_model]
    if len(pats) < 100:
        sys.exit(f"only {len(pats)} training patterns on {args.bootstrap_servers} ({args.topic_prefix}); run apmae demo first")
    x = torch.from_numpy(np.stack(pats))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    held = perm[: len(x) // 5]
    train = perm[len(x) // 5:]
    rows = []
    for scaled in (True, False):
        torch.manual_seed(0)
        m = APMAE(variant(args.variant, log_scale=scaled))
        lr = args.lr or scaled_lr(args.batch)
        opt = make_optimizer(m, lr)
        sched = Schedule(lr, args.steps, args.warmup)
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for s in range(args.steps):
            idx = train[torch.randint(len(train), (args.batch,), generator=g)]
            train_step(m, opt, x[idx], sched.at(s), g)
        loss = E.reconstruction_losses(m, x[held])
        base = E.mean_patch_losses(m, x[train], x[held])
        E.figure1(m, x[held[0]], RESULTS / f"figure1-{'log' if scaled else 'raw'}.png")
        rows.append({"log_scaling": scaled, "variant": args.variant, "patterns": len(x), "steps": args.steps, "lr": lr, "train_s": time.perf_counter() - t0,
                     "loss_mean": float(loss.mean()), "loss_std": float(loss.std()),
                     "mean_patch_baseline": float(base.mean()), "ratio_to_baseline": float(loss.mean() / base.mean())})
    print(table(rows, list(rows[0])))
    print("wrote", write_result("log_scaling", {"rows": rows}))


if __name__ == "__main__":
    main()
