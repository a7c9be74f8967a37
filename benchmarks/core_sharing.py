"""Is a "spare core" on this machine a core of its own, and what does the GIL add? (issue #14)

The encoder with one torch thread and the input on the other core ran its forward ~20% slower
inside the service than alone (session 17's profile), as the trainer's step did at full
threads. Before blaming our code, this measures the machine: the encoder's raw in-memory
forward (the raw side of ``benchmarks/encoder.py``: small AP-MAE, 1 torch thread, packed
patterns, batches of 128), pinned to CPU 0, alone and beside a neighbour pinned to CPU 1, in
paired rounds whose order rotates. The neighbour's work:

- ``spin``: a pure-ALU loop in registers (no memory traffic): slows the forward only if the
  two vCPUs share a physical core (SMT siblings on the host) or the host takes the time away;
- ``stream``: numpy copies between two 64 MiB arrays (memory bandwidth, evicts the shared L3);
- ``input``: the encoder's own input work on the same payloads, in a loop (zstd decompress
  of a batch as the client does, ``read_packed``, ``packed_values``);
- ``forward``: a second copy of the same 1-thread forward (what a second torch thread is).

Each neighbour is a **process** (no GIL, no allocator, no Python state in common: the
hardware and the host only). It works back to back (``--duty 1``), or paced to a share of
its core (``--duty 0.25``: about what the encoder service's helpers, consumer IO and broker
keep busy beside its forward). Options add conditions to the same rounds:

- ``--as-thread``: each neighbour again as a **thread** of this process, on the same core:
  the hardware's cost and the GIL's, which the eager forward takes back between its ops;
- ``--traced``: a TorchScript-traced copy of the forward (``torch.jit.trace``, deprecated in
  this torch but shipped), which runs its whole graph without the GIL, beside each
  neighbour as well: beside a thread it shows what the GIL alone costs the eager forward.
  Measured here, not used by the encoder (docs/THROUGHPUT.md, session 28);
- ``--threads 2``: the forward's two torch threads on both cores, nothing pinned: the
  neighbour takes a share of the very cores the forward uses (the producer's and the small
  trainer's case), and a team member preempted holds its partner at the next barrier.

Each cell is paired with the same forward alone in the same round: ``slowdown`` (seconds
beside / alone; > 1 is lost forward speed) and ``cpu`` (the main thread's CPU for the same
patterns, beside / alone), median and distribution-free 95% interval over rounds; the main
thread's share of its wall asleep (a lock, the GIL); the neighbour's achieved duty (its CPU
over its wall).

    python benchmarks/core_sharing.py [--patterns 1024] [--rounds 8] [--neighbours spin,input]
                                      [--duty 0.25] [--as-thread] [--traced] [--threads 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (  # noqa: E402
    main_thread_sched,
    median_ci,
    table,
    timed_forward,
    traced_embed,
    write_result,
)

NEIGHBOURS = ("spin", "stream", "input", "forward")
FORWARD_CPU, NEIGHBOUR_CPU = 0, 1


def _pin(cpu: int) -> None:
    """Pin the calling thread (or a new process's only thread) to ``cpu``."""
    if hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


def _encoder_forwards(n: int, batch: int, threads: int, traced: bool) -> dict:
    """The raw side of benchmarks/encoder.py, built in the calling process: name -> (() ->
    seconds), ``eager`` and (with ``traced``) the same model TorchScript-traced."""
    import torch

    from apmae.codec import packed_values, read_packed
    from apmae.mae import APMAE, variant
    from benchmarks.bus import patterns

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = APMAE(variant("small")).eval()
    packed = packed_values(read_packed(patterns(n), 256)[0])  # (n, 32896) packed lower triangles
    embeds = {"eager": model.embed}
    if traced:
        embeds["traced"] = traced_embed(model)

    return {name: (lambda e=e: timed_forward(e, packed, batch)[0]) for name, e in embeds.items()}


def _work(kind: str, batch: int, threads: int):
    """One unit of a neighbour's work (see the module docstring)."""
    if kind == "spin":
        def work() -> None:
            x = 0
            for i in range(200_000):  # a Python loop: registers and L1 only
                x = (x * 1103515245 + i) & 0xFFFFFFFF
        return work
    if kind == "stream":
        import numpy as np

        a, b = np.ones(8 << 20), np.empty(8 << 20)  # 64 MiB each, twice the L3

        def work() -> None:
            np.copyto(b, a)
            np.copyto(a, b)
        return work
    if kind == "input":
        import zstandard

        from apmae.codec import packed_values, read_packed
        from benchmarks.bus import patterns

        payloads = patterns(batch)
        blob = zstandard.ZstdCompressor().compress(b"".join(payloads))
        dec = zstandard.ZstdDecompressor()

        def work() -> None:
            dec.decompress(blob)
            packed_values(read_packed(payloads, 256)[0])
        return work
    if kind == "forward":
        return _encoder_forwards(batch * 2, batch, threads, traced=False)["eager"]
    raise ValueError(f"unknown neighbour {kind!r}; one of {NEIGHBOURS}")


def _neighbour(kind: str, pin: bool, batch: int, threads: int, duty: float, ready, stop, cpu_out) -> None:
    """Run ``kind`` (on CPU 1 if ``pin``) until ``stop`` is set, each unit followed by a wait
    that makes its CPU ``duty`` of the wall; ``ready`` once it is at work; on the way out its
    CPU seconds over its wall seconds into ``cpu_out[0]``."""
    if pin:
        _pin(NEIGHBOUR_CPU)
    work = _work(kind, batch, threads)
    work()
    ready.set()
    c0, w0 = time.thread_time(), time.perf_counter()
    while not stop.is_set():
        c, t = time.thread_time(), time.perf_counter()
        work()
        if duty < 1:  # paced on its CPU, not its wall: unpinned, it also waits for a core
            stop.wait(max((time.thread_time() - c) / duty - (time.perf_counter() - t), 0.0))
    cpu_out[0] = (time.thread_time() - c0) / (time.perf_counter() - w0)


def measure(n: int, batch: int, rounds: int, neighbours: tuple[str, ...] = NEIGHBOURS, duty: float = 1.0,
            as_thread: bool = False, traced: bool = False, threads: int = 1) -> dict:
    pin = threads == 1  # one torch thread: the forward has CPU 0 to itself, the neighbour CPU 1
    if pin:
        _pin(FORWARD_CPU)  # the main thread: torch's one thread is this one
    forwards = _encoder_forwards(n, batch, threads, traced)
    for forward in forwards.values():
        forward()  # warm-up (and TorchScript's profiling runs)
    ctx = mp.get_context("spawn")

    def beside(fwd: str, kind: str, where: str) -> tuple[float, float, float, float]:
        """(forward seconds, main-thread CPU seconds, main-thread seconds asleep, neighbour duty)."""
        worker = None
        if kind != "alone":
            if where == "process":
                ready, stop, cpu, start = ctx.Event(), ctx.Event(), ctx.Array("d", 1), ctx.Process
            else:
                ready, stop, cpu, start = threading.Event(), threading.Event(), [0.0], threading.Thread
            worker = start(target=_neighbour, args=(kind, pin, batch, threads, duty, ready, stop, cpu), daemon=True)
            worker.start()
            if not ready.wait(120):
                stop.set()
                if where == "process":
                    worker.kill()  # as before the fold: a neighbour that never started is not left running
                raise RuntimeError(f"neighbour {kind} ({where}) did not start")
        (on0, wait0), seconds = main_thread_sched(), forwards[fwd]()
        on, waiting = main_thread_sched()
        duty_got = 0.0
        if worker is not None:
            stop.set()
            worker.join(30)
            if worker.is_alive():
                raise RuntimeError(f"neighbour {kind} ({where}) did not stop")
            duty_got = cpu[0]
        return seconds, on - on0, seconds - (on - on0) - (waiting - wait0), duty_got

    wheres = ("process", "thread") if as_thread else ("process",)
    conds = [(f, k, w) for f in forwards for k in ("alone", *neighbours) for w in (wheres if k != "alone" else ("",))]
    t: dict[tuple, list] = {c: [] for c in conds}
    for r in range(rounds):  # rotated, and reversed every other round: no cell always follows the same one
        shift = r % len(conds)
        order = conds[shift:] + conds[:shift]
        for c in order if r % 2 == 0 else order[::-1]:
            t[c].append(beside(*c))
        print(f"round {r + 1}/{rounds}", flush=True)
    rows = []
    for fwd, kind, where in conds:
        if kind == "alone":
            continue
        alone, got = t[(fwd, "alone", "")], t[(fwd, kind, where)]
        med, lo, hi, cov = median_ci([b[0] / a[0] for a, b in zip(alone, got, strict=True)])
        cpu, cpu_lo, cpu_hi, _ = median_ci([b[1] / a[1] for a, b in zip(alone, got, strict=True)])
        rows.append({"forward": fwd, "neighbour": kind, "as": where,
                     "forward_patterns_per_s": n / statistics.median(g[0] for g in got),
                     "alone_patterns_per_s": n / statistics.median(a[0] for a in alone),
                     "slowdown": med, "ci_low": lo, "ci_high": hi, "coverage": cov,
                     "cpu": cpu, "cpu_ci": f"{cpu_lo:.3f}-{cpu_hi:.3f}",
                     "asleep": statistics.median(g[2] / g[0] for g in got),
                     "alone_asleep": statistics.median(a[2] / a[0] for a in alone),
                     "duty": statistics.median(g[3] for g in got), "rounds": rounds})
    return {"rows": rows, "seconds": {"/".join(filter(None, c)): [g[0] for g in v] for c, v in t.items()},
            "cpus": os.cpu_count(), "patterns": n, "batch": batch, "threads": threads, "duty_asked": duty}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patterns", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--neighbours", default=",".join(NEIGHBOURS), help=f"some of {', '.join(NEIGHBOURS)}")
    ap.add_argument("--duty", type=float, default=1.0, help="the neighbour's share of its core (1: back to back)")
    ap.add_argument("--as-thread", action="store_true", help="each neighbour also as a thread of this process")
    ap.add_argument("--traced", action="store_true", help="a TorchScript-traced forward too (holds no GIL)")
    ap.add_argument("--threads", type=int, default=1, help="the forward's torch threads (1: pinned to CPU 0)")
    args = ap.parse_args()
    neighbours = tuple(k for k in args.neighbours.split(",") if k)
    if unknown := set(neighbours) - set(NEIGHBOURS):
        ap.error(f"unknown neighbours {sorted(unknown)}; choose from {', '.join(NEIGHBOURS)}")
    if not 0 < args.duty <= 1:
        ap.error("--duty is a share of a core: 0 < duty <= 1")
    if (os.cpu_count() or 1) < 2:
        sys.exit("core_sharing.py needs two CPUs (one for the forward, one for the neighbour)")
    res = measure(args.patterns, args.batch, args.rounds, neighbours, args.duty, args.as_thread, args.traced,
                  args.threads)
    print(table(res["rows"], list(res["rows"][0])))
    print("slowdown = forward seconds beside the neighbour / alone, same round (1.0: a core of its own); "
          "cpu = the main thread's CPU for the same patterns, beside / alone; asleep: of the main thread's wall")
    print("wrote", write_result("core_sharing" if args.threads == 1 else f"core_sharing-t{args.threads}", res))


if __name__ == "__main__":
    main()
