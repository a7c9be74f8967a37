"""Does the trainer's input overlap its training step? Paired rounds of three conditions.

``benchmarks/trainer.py`` gives one broker run between two in-memory runs. This one repeats,
in alternating order, on one model that keeps training:

- ``alone``: ``--steps`` training steps from tensors in RAM;
- ``beside_input``: the same steps while the trainer's input pipeline (its prefetch thread and
  consumer, in a thread of this process) reads the same topic, paced at one batch per step:
  the cost of the input running *beside* the step, the GIL and the cores shared (the float32
  conversion stays out: the service runs it on the training thread; here it would start a
  second OpenMP team);
- ``service``: the trainer service's own loop (``Trainer.run``) from the broker, steps 2..N.

Each condition's rate relative to ``alone`` is the median over ``--rounds`` of the ratio to the
``alone`` run of the same round. Run it at different torch thread counts (``OMP_NUM_THREADS``)
to see whether a gap comes from the input or from the cores it shares with torch's team.
Beside each rate, where the cores went over the same span, each as a share of every core:
``busy_share`` (the machine's busy CPU), ``training_share`` (this process's main thread and
torch's OpenMP workers), ``input_share`` (its other Python threads: the trainer's prefetch
and the Kafka client's IO), ``servers_share`` (the broker's and Redis's processes); and
``training_cpu_vs_alone``, the training's own CPU for the same steps over ``alone``'s. With
the cores all busy, a training that costs what it costs alone, slowed by the share the input
and the servers take, is bound by this machine's cores; a training that costs more CPU for
the same steps loses to something else (its OpenMP team waiting on a preempted member).
``--switch-interval S`` adds ``service_switch``: the service again with CPython's GIL switch
interval at S seconds (the default is 5 ms) while it runs; its ``vs_service`` is its rate over
the same round's ``service`` (does a quicker GIL hand-off between the training thread and the
input's threads buy anything?).

    OMP_NUM_THREADS=1 python benchmarks/trainer_overlap.py [--rounds 4] [--steps 60] [--switch-interval 0.0005]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (  # noqa: E402
    SHARES_LEGEND,
    add_allocator_option,
    cpu_shares,
    cpu_split,
    embedded_infra,
    gil_switch_interval,
    median_ci,
    server_processes,
    span,
    table,
    tune_allocator,
    watch_thread_ends,
    write_result,
)


def input_paced(cfg, tick_s: float, steps: int, ready: threading.Event) -> None:
    """The trainer's input pipeline, consumed at one batch per ``tick_s`` (the training pace)."""
    from services.trainer import Trainer
    from services.trainer_input import wait_for_batch

    tr = Trainer(cfg)
    tr.open()
    try:
        first = wait_for_batch(tr.prefetch, time.monotonic() + 60, tr.stop)  # its first block, before the clock
        tr.prefetch.progress.on_trained(first.items)
        ready.set()
        t0 = time.perf_counter()
        for s in range(1, steps):
            time.sleep(max(0.0, t0 + s * tick_s - time.perf_counter()))
            b = wait_for_batch(tr.prefetch, time.monotonic() + 60, tr.stop)
            assert b is not None, "the input pipeline stalled"
            tr.prefetch.progress.on_trained(b.items)
    finally:
        ready.set()
        tr.close()


class Snapshot(NamedTuple):
    """Where a span's time went: wall; the machine's busy CPU; this process's CPU on its main
    thread and torch's OpenMP workers (the training) and on its other Python threads (the
    input: prefetch, the Kafka client's IO); the broker's and Redis's processes; the main
    thread's seconds on a CPU and runnable waiting for one (``main_thread_sched``)."""

    wall: float
    busy: float
    training: float
    input: float
    servers: float
    main_thread_on_cpu: float
    main_thread_waiting: float

    @staticmethod
    def between(a: dict, b: dict, servers: dict) -> Snapshot:
        """From two ``cpu_split`` readings."""
        s = span(a, b)
        return Snapshot(s["wall"], s["busy"], s["main"], s.get("input", 0.0), sum(s[name] for name in servers),
                        s["main_thread_on_cpu"], s["main_thread_waiting"])


def run(rounds: int, steps: int, batch: int, variant: str, switch_s: float | None = None) -> dict:
    from apmae.codec import encode_pattern, packed_values, read_packed
    from apmae.mae import APMAE
    from apmae.mae import variant as make
    from apmae.recipe import TrainingConfig
    from apmae.train import Schedule, make_optimizer, scaled_lr, train_step
    from benchmarks.trainer import patterns, publish_training_set
    from services.trainer import Trainer, TrainerConfig

    n = steps * batch
    wire = [encode_pattern(p) for p in patterns(n)]
    watch_thread_ends()  # before any thread starts: a thread that ends inside a span counts in its group
    with embedded_infra(("broker", "redis")) as infra:
        servers = server_processes(infra)
        cfg = TrainerConfig(bootstrap_servers=infra.bootstrap_servers, redis_url=infra.redis_url,
                            state_dir=Path(tempfile.mkdtemp(prefix="apmae-bench-overlap-")), topic_prefix="overlap.",
                            train=TrainingConfig(variant=variant, batch_size=batch, steps=steps),
                            checkpoint_every=10 ** 9, name="overlap", idle_timeout_s=30)
        publish_training_set(cfg, wire)

        torch.manual_seed(0)
        model = APMAE(make(variant))
        opt = make_optimizer(model, scaled_lr(batch))
        sched = Schedule(scaled_lr(batch), steps)
        x_all = packed_values(read_packed(wire, 256)[0])
        g = torch.Generator().manual_seed(0)
        train_step(model, opt, x_all[:batch], sched.at(0), g)  # warm-up, not timed

        def clocks() -> dict:
            return cpu_split(servers, lambda t: "input")

        def alone() -> Snapshot:
            a = clocks()
            for s in range(steps):
                train_step(model, opt, x_all[s * batch:(s + 1) * batch], sched.at(s), g)
            return Snapshot.between(a, clocks(), servers)

        tick = alone().wall / steps
        spans: dict[str, list[Snapshot]] = {"alone": [], "beside_input": [], "service": []}
        if switch_s:
            spans["service_switch"] = []
        for k in range(rounds):
            order = list(spans) if k % 2 == 0 else list(spans)[::-1]
            for cond in order:
                if cond == "alone":
                    taken = alone()
                elif cond == "beside_input":
                    ready = threading.Event()
                    th = threading.Thread(target=input_paced, args=(replace(cfg, name=f"input{k}"), tick, steps, ready))
                    th.start()
                    ready.wait()
                    taken = alone()
                    th.join()
                else:
                    stamps: list[dict] = []  # at each step's end
                    with gil_switch_interval(switch_s if cond == "service_switch" else None):
                        Trainer(replace(cfg, name=f"{cond}{k}"),
                                on_batch=lambda ids, stamps=stamps: stamps.append(clocks())).run()
                    # steps 2..N, as alone's follow a warm-up
                    taken = Snapshot(*(x * steps / (len(stamps) - 1)
                                      for x in Snapshot.between(stamps[0], stamps[-1], servers)))
                spans[cond].append(taken)
    rows = []
    for cond, v in spans.items():
        shares = cpu_shares([x._asdict() for x in v])
        med, lo, hi, coverage = median_ci([a.wall / c.wall for a, c in zip(spans["alone"], v, strict=True)])
        cpu_med, cpu_lo, cpu_hi, _ = median_ci([c.training / a.training for a, c in zip(spans["alone"], v, strict=True)])
        rows.append({"condition": cond, "torch_threads": torch.get_num_threads(),
                     "patterns_s": n / statistics.median(x.wall for x in v),
                     "vs_alone": med, "ci": f"{lo:.3f}-{hi:.3f}", "ci_coverage": round(coverage, 3),
                     **{f"{part}_share": shares[part] for part in ("busy", "training", "input", "servers")},
                     # the main thread's wall: on a CPU, runnable waiting for one, asleep (the
                     # GIL, torch's workers at a barrier, a wait on the input)
                     **{part: share for part, share in shares.items() if part.startswith("main_thread_")},
                     # the training's own CPU for the same steps, over alone's in the same round
                     "training_cpu_vs_alone": cpu_med, "training_cpu_ci": f"{cpu_lo:.3f}-{cpu_hi:.3f}",
                     "spans": [x._asdict() for x in v]})
        if cond == "service_switch":
            med, lo, hi, _ = median_ci([a.wall / c.wall for a, c in zip(spans["service"], v, strict=True)])
            rows[-1] |= {"switch_interval_s": switch_s, "vs_service": f"{med:.3f} ({lo:.3f}-{hi:.3f})"}
    return {"variant": variant, "steps": steps, "batch": batch, "rounds": rounds, "switch_interval_s": switch_s,
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--variant", default="small")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="also run the service with the GIL switch interval at this many seconds (paired)")
    add_allocator_option(ap)
    args = ap.parse_args()
    tuned = tune_allocator(args)
    res = {"allocator_tuned": tuned, **run(args.rounds, args.steps, args.batch, args.variant, args.switch_interval)}
    print(table(res["rows"], [c for c in res["rows"][-1] if c != "spans"]))
    print(f"vs_alone: rate / the in-memory rate of the same round, median of {args.rounds} rounds "
          f"(ci: distribution-free interval of the median, its coverage beside it: below 0.95 with under 6 rounds, where it is the min-max)")
    print(SHARES_LEGEND)
    threads = torch.get_num_threads()
    print("wrote", write_result(f"trainer_overlap-t{threads}", res))


if __name__ == "__main__":
    main()
