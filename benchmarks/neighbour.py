"""What a neighbour on the other core costs a forward that has a core of its own (#14, target 4).

The encoder service (1 torch thread, ``benchmarks/encoder.py``) spends 1.05-1.25x the raw
forward's CPU on the same patterns, and its main thread sleeps ~5% of its wall. Two causes
can do that, and this benchmark separates them. The raw forward (small AP-MAE, batches of
128, pinned to core 0, one torch thread) runs beside the same side work pinned to core 1 at
the same duty, once in **another process** (nothing shared but the hardware: caches, memory
bandwidth, a hypervisor's sibling threads) and once in **a thread of this process** (the
hardware, and the GIL the forward takes back between its ops). The side work is the
encoder helper's (``read_packed`` of a batch of 128 wire payloads) or pure Python (dict
stores: the GIL held throughout, the worst case).

A third forward, TorchScript-traced (``torch.jit.trace``, deprecated in this torch but still
shipped), runs the whole graph without the GIL: beside a thread it shows what the GIL alone
costs the eager forward. It is measured here, not used by the encoder (see docs/THROUGHPUT.md,
session 28: in the service it did not lower the main thread's sleep).

With ``--threads 2`` the forward's two torch threads take both cores and nothing is pinned:
the neighbour then takes a share of the cores the forward uses (the producer's and the small
trainer's case, targets 3 and 5), and a team member preempted holds its partner at the
next barrier.

Per round, every (forward, neighbour) condition runs ``--batches`` forward batches in an
order reversed every other round; each condition's wall and the main thread's CPU are paired
with the same forward's no-neighbour run of the same round (median and distribution-free 95%
interval over rounds).

    python benchmarks/neighbour.py [--rounds 8] [--batches 8] [--duty 0.25] [--threads 1]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import main_thread_sched, median_ci, table, write_result
from benchmarks.bus import patterns

FORWARD_CORE, NEIGHBOUR_CORE = 0, 1
NEIGHBOURS = ("none", "process_read", "process_python", "thread_read", "thread_python")
BATCH = 128


def side_work(kind: str, payloads: list[bytes]):
    """One unit of the neighbour's work: the encoder helper's read of a batch, or pure Python."""
    from apmae.codec import read_packed

    if kind == "read":
        return lambda: read_packed(payloads, 256)

    def python() -> None:
        d: dict[int, int] = {}
        for i in range(20_000):
            d[i & 1023] = i
    return python


def neighbour_loop(kind: str, duty: float, stop, cpu_out, payloads: list[bytes], pin: bool) -> None:
    """Side work paced at ``duty`` of a core (each unit of work, then asleep long enough for
    the unit to be that share of the wall); when stopped, writes its CPU and wall seconds to
    ``cpu_out``."""
    if pin:
        os.sched_setaffinity(0, {NEIGHBOUR_CORE})  # the calling thread's (or process's) core
    work = side_work(kind, payloads)
    c0, w0 = time.thread_time(), time.perf_counter()
    while not stop.is_set():
        t = time.perf_counter()
        work()
        busy = time.perf_counter() - t
        time.sleep(busy * (1 - duty) / duty)
    cpu_out[0], cpu_out[1] = time.thread_time() - c0, time.perf_counter() - w0


def run(rounds: int, batches: int, duty: float, threads: int = 1) -> dict:
    import torch

    from apmae.codec import packed_values, read_packed
    from apmae.mae import APMAE, variant

    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("neighbour.py needs two cores: the forward's and the neighbour's")
    torch.set_num_threads(threads)
    pin = threads == 1  # one thread: the forward has core 0 to itself, the neighbour core 1
    if pin:
        os.sched_setaffinity(0, {FORWARD_CORE})  # the main thread: torch's one thread is this one
    torch.manual_seed(0)
    model = APMAE(variant("small")).eval()
    payloads = patterns(BATCH)
    x = packed_values(read_packed(payloads, 256)[0])  # (128, 32896) packed lower triangles

    class Embed(torch.nn.Module):
        def __init__(self, m: APMAE):
            super().__init__()
            self.m = m

        def forward(self, p: torch.Tensor) -> torch.Tensor:
            return self.m.embed(p)

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript's deprecation, and the tracer's own notes
        traced = torch.jit.freeze(torch.jit.trace(Embed(model).eval(), x))
    with torch.inference_mode():
        assert torch.allclose(traced(x), model.embed(x), atol=1e-4), "the traced forward differs from eager"
    forwards = {"eager": model.embed, "traced": traced}

    def timed(fn) -> tuple[float, float, float]:
        """(wall, main thread CPU, main thread asleep) seconds for ``batches`` forwards."""
        s0, w0 = main_thread_sched(), time.perf_counter()
        with torch.inference_mode():
            for _ in range(batches):
                fn(x)
        (on, waiting), wall = main_thread_sched(), time.perf_counter() - w0
        return wall, on - s0[0], wall - (on - s0[0]) - (waiting - s0[1])

    def condition(fwd: str, neighbour: str) -> tuple[float, float, float, float]:
        """timed() beside the neighbour, and the neighbour's achieved duty (CPU over wall)."""
        if neighbour == "none":
            return (*timed(forwards[fwd]), 0.0)
        where, kind = neighbour.split("_")
        if where == "process":
            ctx = mp.get_context("fork")  # the child runs numpy and Python only, never torch
            stop, cpu = ctx.Event(), ctx.Array("d", 2)
            worker = ctx.Process(target=neighbour_loop, args=(kind, duty, stop, cpu, payloads, pin))
        else:
            stop, cpu = threading.Event(), [0.0, 0.0]
            worker = threading.Thread(target=neighbour_loop, args=(kind, duty, stop, cpu, payloads, pin))
        worker.start()
        time.sleep(0.2)  # the neighbour at its pace before the clock
        out = timed(forwards[fwd])
        stop.set()
        worker.join()
        return (*out, cpu[0] / cpu[1])

    with torch.inference_mode():
        for fn in forwards.values():  # warm: allocator, TorchScript's profiling runs
            for _ in range(3):
                fn(x)
    conds = [(f, nb) for f in forwards for nb in NEIGHBOURS]
    t: dict[tuple[str, str], list] = {c: [] for c in conds}
    for k in range(rounds):
        for c in conds if k % 2 == 0 else conds[::-1]:
            t[c].append(condition(*c))
        print(f"round {k + 1}/{rounds} done", flush=True)

    rows = []
    for fwd, nb in conds:
        base, got = t[(fwd, "none")], t[(fwd, nb)]
        rate, rate_lo, rate_hi, _ = median_ci([b[0] / g[0] for b, g in zip(base, got, strict=True)])
        cpu, cpu_lo, cpu_hi, _ = median_ci([g[1] / b[1] for b, g in zip(base, got, strict=True)])
        asleep = median_ci([g[2] / g[0] for g in got])[0]
        rows.append({"forward": fwd, "neighbour": nb,
                     "patterns_per_s": BATCH * batches / median_ci([g[0] for g in got])[0],
                     "rate_vs_alone": rate, "rate_ci": f"{rate_lo:.3f}-{rate_hi:.3f}",
                     "cpu_vs_alone": cpu, "cpu_ci": f"{cpu_lo:.3f}-{cpu_hi:.3f}",
                     "main_thread_asleep": asleep,
                     "neighbour_duty": median_ci([g[3] for g in got])[0]})
    return {"rounds": rounds, "batches": batches, "batch": BATCH, "duty": duty, "threads": threads, "variant": "small",
            "rows": rows, "seconds": {f"{f}/{nb}": [g[:3] for g in v] for (f, nb), v in t.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batches", type=int, default=8, help="forward batches of 128 per condition and round")
    ap.add_argument("--duty", type=float, default=0.25,
                    help="the neighbour's share of core 1 (the encoder service keeps ~0.2 of a core busy beside "
                         "its forward)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the forward (1: pinned to core 0)")
    args = ap.parse_args()
    res = run(args.rounds, args.batches, args.duty, args.threads)
    print(table(res["rows"], list(res["rows"][0])))
    print("rate_vs_alone: patterns/s beside the neighbour over alone, the same forward, paired per round; "
          "cpu_vs_alone: the main thread's CPU for the same batches over alone's; "
          "main_thread_asleep: of its wall (the GIL, for a thread neighbour)")
    print("wrote", write_result("neighbour" if args.threads == 1 else f"neighbour-t{args.threads}", res))


if __name__ == "__main__":
    main()
