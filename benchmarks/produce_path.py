"""What services/bus/kafka_fixes.py saves producing: kafka-python's producer as shipped vs with the fixes.

Our bus (``benchmarks.bus.produce_ours``: ``Bus.send`` of pattern records, then ``Bus.flush``)
sends the same 3,000 pattern messages (PatternRecords, envelope and all, 65.9 KB) to the
embedded broker, once with kafka-python's own functions ("stock") and once with the fixes
("fixed"), uncompressed and with zstd (the patterns' default codec). The fix that matters
here is the wake-up: kafka-python writes a byte to its IO loop's socketpair on every send that
fills a batch, which, with the broker slower than the sends, is nearly every send (2,841 of
3,000, counted); the fixed one writes it only when none is waiting. In each round both sides
run back to back into a fresh topic, the order alternating between rounds, so drift of a
noisy machine falls on both; each round gives paired ratios, the table their medians with a
distribution-free 95% interval (``median_ci``). CPU is this process's (every thread: the
sending loop's and the producer's sender thread); beside it the sending loop's own thread CPU,
the machine's busy CPU (the broker's too) and the wall rate, clocked from the first send to
the flush's return. A fixed/stock CPU ratio below 1 is CPU saved.

    python benchmarks/produce_path.py [--messages 3000] [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (
    add_allocator_option,
    embedded_infra,
    median_ci,
    table,
    tune_allocator,
    write_result,
)
from benchmarks.bus import Timed, pattern_records, patterns, produce_ours
from benchmarks.consume_path import client_as, stock_vs_fixed_row


def _with_loop_cpu(fn) -> tuple[Timed, float]:
    """``fn()``'s span and the calling thread's CPU-seconds over it (the sending loop's)."""
    c0 = time.thread_time()
    span = fn()
    return span, time.thread_time() - c0


def run(n: int, rounds: int) -> dict:
    from apmae.config import BusConfig
    from apmae.messages import encode
    from apmae.topics import PATTERNS_MINE
    from services.bus import Bus, kafka_fixes, native_crc32c

    recs = pattern_records(patterns(n))
    msg_bytes = len(encode(recs[0]))
    rows = []
    with embedded_infra(("broker",)) as infra:
        for comp in ("none", "zstd"):
            t: dict[str, list[Timed]] = {"stock": [], "fixed": []}
            loop_cpu: dict[str, list[float]] = {"stock": [], "fixed": []}
            for k in range(rounds):
                for side in ("stock", "fixed") if k % 2 == 0 else ("fixed", "stock"):
                    client_as(side)
                    cfg = BusConfig(bootstrap_servers=infra.bootstrap_servers, compression=comp,
                                    topic_prefix=f"{comp}{k}{side}.")
                    bus = Bus(cfg, "bench")
                    bus.ensure_topics([PATTERNS_MINE])
                    span, loop = _with_loop_cpu(lambda cfg=cfg: produce_ours(cfg, recs))
                    t[side].append(span)
                    loop_cpu[side].append(loop)
                    admin = bus.admin()
                    admin.delete_topics([bus.name(PATTERNS_MINE)])  # the in-memory broker holds one round
                    admin.close()
                    bus.close()
            kafka_fixes.install()
            loop = median_ci([f / s for s, f in zip(loop_cpu["stock"], loop_cpu["fixed"], strict=True)])
            rows.append({
                **stock_vs_fixed_row(comp, n, rounds, msg_bytes, t),
                "stock_loop_us_msg": statistics.median(loop_cpu["stock"]) / n * 1e6,
                "fixed_loop_us_msg": statistics.median(loop_cpu["fixed"]) / n * 1e6,
                "loop_cpu_fixed_stock": f"{loop[0]:.2f} ({loop[1]:.2f}-{loop[2]:.2f})",
                "loop_cpu_seconds": {side: [round(x, 3) for x in v] for side, v in loop_cpu.items()},
            })
    return {"native_crc32c": native_crc32c(), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=10)
    add_allocator_option(ap)
    args = ap.parse_args()
    res = {"allocator_tuned": tune_allocator(args), **run(args.messages, args.rounds)}
    print(table(res["rows"], [c for c in res["rows"][0] if not c.endswith("seconds")]))
    print(f"us_cpu_msg: this process's CPU a message (loop_us_msg: the sending thread's), median of {args.rounds} "
          f"rounds; *_fixed_stock: fixed over stock, median of paired rounds (95% interval; CPU below 1: saved; "
          f"rate above 1: faster)")
    print("wrote", write_result("produce_path", res))


if __name__ == "__main__":
    main()
