"""Does a second thread that once ran torch ops slow the training step? (issue #14)

The trainer's prefetch thread decoded with torch ops (``apmae.codec.decode_many``) until
2026-12-03; it now reads with numpy (``read_packed``). With
GNU OpenMP, each thread that enters a parallel region gets its own thread team; more busy-
waiting OpenMP threads than cores makes libgomp shorten its spin, so the training team's
workers sleep and are woken between regions. This measures the in-memory training loop
(the benchmark's ``memory`` side) with no other thread (A) and with an idle thread that has
once run a parallel torch op (B), interleaved A B A B ..., in one run.

    python benchmarks/omp_threads.py [--steps 30] [--paper-steps 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._common import table, write_result  # noqa: E402


def measure(variant: str, steps: int, batch: int, rounds: int) -> dict:
    from apmae.mae import APMAE
    from apmae.mae import variant as make
    from apmae.train import Schedule, make_optimizer, scaled_lr, train_step
    from benchmarks.trainer import patterns

    torch.manual_seed(0)
    model = APMAE(make(variant))
    opt = make_optimizer(model, scaled_lr(batch))
    sched = Schedule(scaled_lr(batch), steps)
    x = torch.from_numpy(np.stack(patterns(batch)))
    g = torch.Generator().manual_seed(0)
    train_step(model, opt, x, sched.at(0), g)  # warm-up

    def loop() -> float:
        t = time.perf_counter()
        for s in range(steps):
            train_step(model, opt, x, sched.at(s), g)
        return time.perf_counter() - t

    park = threading.Event()

    def torch_once_then_idle() -> None:
        (torch.zeros(batch, 256, 256) + 1).sum()  # a parallel region on this thread
        park.wait()

    a_s, b_s = [], []
    for _ in range(rounds):
        a_s.append(loop())
        park.clear()
        th = threading.Thread(target=torch_once_then_idle, daemon=True)
        th.start()
        time.sleep(0.2)
        b_s.append(loop())
        park.set()
        th.join()
    return {"variant": variant, "batch": batch, "steps": steps, "rounds": rounds,
            "A_steps_per_s": steps / min(a_s), "B_steps_per_s": steps / min(b_s),
            "B_over_A": min(a_s) / min(b_s), "A_s": a_s, "B_s": b_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--paper-steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows = [measure("small", args.steps, 64, args.rounds), measure("paper", args.paper_steps, 16, args.rounds)]
    cols = ["variant", "batch", "steps", "rounds", "A_steps_per_s", "B_steps_per_s", "B_over_A"]
    print(table(rows, cols))
    print(f"A: no other thread; B: an idle thread that once ran a parallel torch op; min of {args.rounds} "
          f"interleaved rounds each; torch threads={torch.get_num_threads()}")
    print("wrote", write_result("omp_threads", {"rows": rows}))


if __name__ == "__main__":
    main()
