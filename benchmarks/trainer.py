"""AP-MAE training throughput: from the broker (the trainer service) vs from in-memory tensors.

Same model, same batch size, same number of steps, in the same run; the ratio is the input
pipeline's overhead that the prefetch thread does not hide (fetch + read of bfloat16 lower
triangles + shuffle, and their float32 conversion on the training thread). Both sides feed
the model packed lower triangles, the wire's layout (``APMAE.patches``; log scaling is inside
the model on both sides); ``memory_square_patterns_s`` is the in-memory side fed (N, S, S)
squares, the way the trainer did until 2026-12-03.

``broker_vs_memory`` compares steady steps on both sides: the memory side is timed after an
untimed warm-up step on a warm model and optimizer, so the broker side counts from the end
of its first step. That first step (a fresh trainer's optimizer state, the allocator's first
blocks, the first block of input) is a one-time cost of a long run; it was inside the
headline until 2026-12-03 (8% of the paper variant's 12 steps), and is reported apart as
``first_step_s`` and in ``with_first_step_vs_memory``. The final checkpoint is not timed.

The small variant runs twice: with torch's threads on every core (the default), and held to
one core fewer (``--spare-cores 1``), so the prefetch thread, the client's network thread and
the broker have a core that the model's OpenMP team does not. The two rows tell an input
that does not overlap the step (both low) from one that overlaps only when it is not
competing with the team for the cores (the second near 1.0): measured, 2026-12-05, it is the
second.

    python benchmarks/trainer.py [--steps 60] [--paper-steps 30] [--spare-cores 1]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._common import (  # noqa: E402
    Clock,
    add_allocator_option,
    cpu_bound,
    embedded_infra,
    table,
    tune_allocator,
    write_result,
)


def patterns(n: int, size: int = 256) -> list[np.ndarray]:
    g = np.random.default_rng(0)
    out = []
    for i in range(n):
        logits = g.normal(size=(size, size)) * (2 + i % 6)
        logits[np.triu_indices(size, 1)] = -np.inf
        e = np.exp(logits - logits.max(1, keepdims=True))
        out.append((e / e.sum(1, keepdims=True)).astype(np.float32))
    return out


def publish_training_set(cfg, wire: list[bytes]) -> None:
    """The encoded patterns as PatternRecords on ``cfg``'s patterns.train, flushed."""
    from apmae.topics import PATTERNS_TRAIN, PatternRecord
    from services.bus import Bus, Output

    bus = Bus(cfg, "bench")
    bus.ensure_topics([PATTERNS_TRAIN])
    for i, payload in enumerate(wire):
        bus.send(Output(PATTERNS_TRAIN, PatternRecord(id=f"p{i}", sample_id=f"s{i}", model="m", task="random",
                                                      layer=0, head=i % 9, correct=True, size=256,
                                                      payload=payload), key=f"m/0/{i}"))
    bus.flush()
    bus.close()


def run(variant: str, steps: int, batch: int, infra) -> dict:
    from apmae.codec import encode_pattern, packed_values, read_packed, unpack
    from apmae.mae import APMAE
    from apmae.mae import variant as make
    from apmae.recipe import TrainingConfig
    from apmae.train import Schedule, make_optimizer, scaled_lr, train_step
    from services.trainer import Trainer, TrainerConfig
    from services.trainer_input import wait_for_batch

    n = steps * batch
    pats = patterns(n)
    wire = [encode_pattern(p) for p in pats]
    state = Path(tempfile.mkdtemp(prefix="apmae-bench-train-"))
    cfg = TrainerConfig(bootstrap_servers=infra.bootstrap_servers, redis_url=infra.redis_url, state_dir=state,
                        topic_prefix=f"{variant}-t{torch.get_num_threads()}.",
                        train=TrainingConfig(variant=variant, batch_size=batch, steps=steps),
                        checkpoint_every=10 ** 9, name=variant, idle_timeout_s=30)
    publish_training_set(cfg, wire)

    # in memory: the same steps on tensors already in RAM, timed before and after the broker
    # run (their mean), so drift of a shared machine falls on both sides
    torch.manual_seed(0)
    model = APMAE(make(variant))
    opt = make_optimizer(model, scaled_lr(batch))
    sched = Schedule(scaled_lr(batch), steps)
    bits = read_packed(wire, 256)[0]
    x_all = packed_values(bits)  # (n, S (S + 1) / 2), as the trainer feeds it
    x_square = unpack(bits, 256)  # the same bf16-rounded values as (n, S, S)
    g = torch.Generator().manual_seed(0)
    train_step(model, opt, x_all[:batch], sched.at(0), g)  # warm-up step, not timed

    def memory(x_all: torch.Tensor = x_all) -> tuple[float, float]:
        clock = Clock().start()
        for s in range(steps):
            train_step(model, opt, x_all[s * batch:(s + 1) * batch], sched.at(s), g)
        return clock.stop()

    def input_alone() -> tuple[float, float]:
        """The trainer's input pipeline with no training: its prefetch thread reads, filters,
        shuffles and decodes the same topic into the same batches (the CPU it costs)."""
        tr = Trainer(replace(cfg, name=f"{variant}-input"))
        clock = Clock().start()
        tr.open()
        for _ in range(steps):
            b = wait_for_batch(tr.prefetch, time.monotonic() + 60, tr.stop)
            assert b is not None, "the input pipeline stalled"
            tr.prefetch.progress.on_trained(b.items)
        out = clock.stop()
        tr.close()
        return out

    before, square_before = memory(), memory(x_square)
    # from the broker: the trainer service's loop
    stamps: list[float] = []  # when each step finished
    t = Trainer(cfg, on_batch=lambda ids: stamps.append(time.perf_counter()))
    out = t.run()
    with_first_rate = out["patterns"] / out["loop_seconds"]  # the loop only: the final checkpoint is not input
    # steps 2..N, as the memory side's steps follow a warm-up step
    steady_rate = (len(stamps) - 1) * batch / (stamps[-1] - stamps[0])
    after, square_after = memory(), memory(x_square)
    square_s = (square_before[0] + square_after[0]) / 2
    mem_s, mem_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
    input_s, input_cpu = input_alone()
    shutil.rmtree(state, ignore_errors=True)
    params = sum(p.numel() for p in model.parameters())
    return {"variant": variant, "torch_threads": torch.get_num_threads(), "params_M": params / 1e6, "batch": batch,
            "steps": steps,
            "memory_patterns_s": n / mem_s, "memory_square_patterns_s": n / square_s, "broker_patterns_s": steady_rate,
            "broker_vs_memory": steady_rate / (n / mem_s),
            "first_step_s": out["loop_seconds"] - (stamps[-1] - stamps[0]),
            "with_first_step_vs_memory": with_first_rate / (n / mem_s),
            # the training step and the input pipeline share the machine's cores: the ratio if
            # they did not overlap at all, and the best ratio their busy CPU-seconds allow
            "input_alone_patterns_s": n / input_s, "serial_bound": mem_s / (mem_s + input_s),
            "memory_cores_busy": mem_cpu / mem_s, "input_cores_busy": input_cpu / input_s,
            "cpu_bound": cpu_bound(mem_s, [mem_cpu, input_cpu])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--paper-steps", type=int, default=30)
    ap.add_argument("--paper-batch", type=int, default=16)
    ap.add_argument("--spare-cores", type=int, default=1,
                    help="cores left to the input in the small variant's second run (0: no second run)")
    add_allocator_option(ap)
    args = ap.parse_args()
    tuned = tune_allocator(args)
    with embedded_infra(("broker", "redis")) as infra:
        rows = [run("small", args.steps, args.batch, infra), run("paper", args.paper_steps, args.paper_batch, infra)]
        threads = torch.get_num_threads()
        if args.spare_cores and threads > args.spare_cores:
            torch.set_num_threads(threads - args.spare_cores)
            try:
                rows.append(run("small", args.steps, args.batch, infra))
            finally:
                torch.set_num_threads(threads)
    print(table(rows, list(rows[0])))
    print("broker_vs_memory = patterns/s from the broker / from RAM (1.0 = the input pipeline is free)")
    print("wrote", write_result("trainer", {"allocator_tuned": tuned, "rows": rows}))


if __name__ == "__main__":
    main()
