"""Is a "spare core" on this machine a core of its own? (issue #14)

The encoder with one torch thread and the input on the other core ran its forward ~20% slower
inside the service than alone (session 17's profile), as the trainer's step did at full
threads. Before blaming our code, this measures the machine: the encoder's raw in-memory
forward (the raw side of ``benchmarks/encoder.py``: small AP-MAE, 1 torch thread, packed
patterns, batches of 128), pinned to CPU 0, alone and beside a neighbour *process* pinned to
CPU 1 (no GIL, no shared allocator, no Python state in common), in paired rounds whose order
rotates:

- ``spin``: a pure-ALU loop in registers (no memory traffic): slows the forward only if the
  two vCPUs share a physical core (SMT siblings on the host) or the host takes the time away;
- ``stream``: numpy copies between two 64 MiB arrays (memory bandwidth, evicts the shared L3);
- ``input``: the encoder's own input work on the same payloads, in a loop (zstd decompress
  of a batch as the client does, ``read_packed``, ``packed_values``);
- ``forward``: a second copy of the same 1-thread forward (what a second torch thread is).

Each cell: the forward's seconds beside the neighbour over its seconds alone in the same
round (slowdown > 1 is lost forward speed), median and distribution-free 95% interval.

    python benchmarks/core_sharing.py [--patterns 1024] [--rounds 8]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import median_ci, table, write_result  # noqa: E402

NEIGHBOURS = ("spin", "stream", "input", "forward")


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


def _encoder_forward(n: int, batch: int):
    """The raw side of benchmarks/encoder.py, built in the calling process: () -> seconds."""
    import torch

    from apmae.codec import packed_values, read_packed
    from apmae.mae import APMAE, variant
    from benchmarks.bus import patterns

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = APMAE(variant("small")).eval()
    packed = packed_values(read_packed(patterns(n), 256)[0])

    def forward() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for k in range(0, n, batch):
                model.embed(packed[k:k + batch])
        return time.perf_counter() - t

    return forward


def _neighbour(kind: str, cpu: int, batch: int, ready, stop) -> None:
    """Run ``kind`` on ``cpu`` until ``stop`` is set; ``ready`` once it is doing its work."""
    _pin(cpu)
    if kind == "spin":
        def work() -> None:
            x = 0
            for i in range(200_000):  # a Python loop: registers and L1 only
                x = (x * 1103515245 + i) & 0xFFFFFFFF
    elif kind == "stream":
        import numpy as np

        a, b = np.ones(8 << 20), np.empty(8 << 20)  # 64 MiB each, twice the L3

        def work() -> None:
            np.copyto(b, a)
            np.copyto(a, b)
    elif kind == "input":
        import zstandard

        from apmae.codec import packed_values, read_packed
        from benchmarks.bus import patterns

        payloads = patterns(batch)
        blob = zstandard.ZstdCompressor().compress(b"".join(payloads))
        dec = zstandard.ZstdDecompressor()

        def work() -> None:
            dec.decompress(blob)
            packed_values(read_packed(payloads, 256)[0])
    elif kind == "forward":
        fwd = _encoder_forward(batch * 2, batch)

        def work() -> None:
            fwd()
    else:
        raise ValueError(f"unknown neighbour {kind!r}; one of {NEIGHBOURS}")
    work()
    ready.set()
    while not stop.is_set():
        work()


def measure(n: int, batch: int, rounds: int) -> dict:
    _pin(0)
    forward = _encoder_forward(n, batch)
    forward()  # warm-up
    ctx = mp.get_context("spawn")
    seconds: dict[str, list[float]] = {"alone": [], **{k: [] for k in NEIGHBOURS}}
    order = ["alone", *NEIGHBOURS]
    for r in range(rounds):
        shift = r % len(order)
        for name in order[shift:] + order[:shift]:
            if name == "alone":
                seconds[name].append(forward())
                continue
            ready, stop = ctx.Event(), ctx.Event()
            p = ctx.Process(target=_neighbour, args=(name, 1, batch, ready, stop), daemon=True)
            p.start()
            if not ready.wait(120):
                p.kill()
                raise RuntimeError(f"neighbour {name} did not start")
            seconds[name].append(forward())
            stop.set()
            p.join(30)
    rows = []
    for name in NEIGHBOURS:
        med, lo, hi, cov = median_ci([b / a for a, b in zip(seconds["alone"], seconds[name], strict=True)])
        rows.append({"neighbour": name, "forward_patterns_per_s": n / statistics.median(seconds[name]),
                     "alone_patterns_per_s": n / statistics.median(seconds["alone"]),
                     "slowdown": med, "ci_low": lo, "ci_high": hi, "coverage": cov, "rounds": rounds})
    return {"rows": rows, "seconds": seconds, "cpus": os.cpu_count(), "patterns": n, "batch": batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patterns", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        sys.exit("core_sharing.py needs two CPUs (one for the forward, one for the neighbour)")
    res = measure(args.patterns, args.batch, args.rounds)
    print(table(res["rows"], list(res["rows"][0])))
    print("slowdown = forward seconds beside the neighbour / alone, same round (1.0: a core of its own)")
    print("wrote", write_result("core_sharing", res))


if __name__ == "__main__":
    main()
