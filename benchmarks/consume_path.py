"""What services/bus/kafka_fixes.py saves: kafka-python's consumer as shipped vs with the fixes.

The same consumer (``benchmarks.bus.consume_raw`` without commits: ``Bus.consumer``'s settings) reads the same pattern
messages (PatternRecords, envelope and all, 65.9 KB) from the embedded broker, once with
kafka-python's own socket read and zstd decode ("stock") and once with the two fixes
("fixed"), for an uncompressed topic and a zstd one (the patterns' default codec). In each
round both sides run back to back on a fresh group, the order alternating between rounds, so
drift of a noisy machine falls on both; each round gives paired ratios, and the table their
medians with a distribution-free 95% interval (``median_ci``). CPU is this process's (every
thread: the poll's caller and the client's IO thread); the machine's busy CPU (the broker's
too) and the wall rate are beside it. A fixed/stock CPU ratio below 1 is CPU saved.

    python benchmarks/consume_path.py [--messages 3000] [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
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
from benchmarks.bus import Timed, _cost_ratio, consume_raw, pattern_records, patterns, round_seconds


def client_as(side: str) -> None:
    """kafka-python as shipped ("stock") or with ``kafka_fixes`` ("fixed"), process-wide."""
    from services.bus import kafka_fixes

    if side == "stock":
        kafka_fixes.uninstall()
    else:
        assert kafka_fixes.install(), "the fixes did not install (APMAE_STOCK_KAFKA=1?)"


def stock_vs_fixed_row(comp: str, n: int, rounds: int, msg_bytes: int, t: dict[str, list[Timed]]) -> dict:
    """One codec's table row from its rounds' spans, by side: CPU a message, the paired CPU,
    busy-CPU and rate ratios (fixed over stock) with their intervals, and the raw seconds."""
    cpu, busy = (_cost_ratio(t["stock"], t["fixed"], kind) for kind in ("cpu", "busy"))
    rate = median_ci([s.wall / f.wall for s, f in zip(t["stock"], t["fixed"], strict=True)])
    return {
        "compression": comp, "messages": n, "rounds": rounds, "msg_bytes": msg_bytes,
        "stock_us_cpu_msg": statistics.median(x.cpu for x in t["stock"]) / n * 1e6,
        "fixed_us_cpu_msg": statistics.median(x.cpu for x in t["fixed"]) / n * 1e6,
        "cpu_fixed_stock": f"{cpu[0]:.2f} ({cpu[1]:.2f}-{cpu[2]:.2f})",
        "busy_fixed_stock": f"{busy[0]:.2f} ({busy[1]:.2f}-{busy[2]:.2f})",
        "stock_MB_s": n * msg_bytes / 1e6 / statistics.median(x.wall for x in t["stock"]),
        "fixed_MB_s": n * msg_bytes / 1e6 / statistics.median(x.wall for x in t["fixed"]),
        "rate_fixed_stock": f"{rate[0]:.2f} ({rate[1]:.2f}-{rate[2]:.2f})",
        "ci_coverage": round(cpu[3], 3),
        **round_seconds(t),
    }


def run(n: int, rounds: int) -> dict:
    from apmae.config import BusConfig
    from apmae.messages import encode
    from apmae.topics import PATTERNS_MINE
    from services.bus import Bus, Output, kafka_fixes, native_crc32c

    recs = pattern_records(patterns(n))
    msg_bytes = len(encode(recs[0]))
    rows = []
    with embedded_infra(("broker",)) as infra:
        for comp in ("none", "zstd"):
            cfg = BusConfig(bootstrap_servers=infra.bootstrap_servers, compression=comp, topic_prefix=f"{comp}.")
            bus = Bus(cfg, "bench")
            bus.ensure_topics([PATTERNS_MINE])
            for r in recs:
                bus.send(Output(PATTERNS_MINE, r, key=r.key))
            bus.flush()
            t: dict[str, list[Timed]] = {"stock": [], "fixed": []}
            for k in range(rounds):
                for side in ("stock", "fixed") if k % 2 == 0 else ("fixed", "stock"):
                    client_as(side)
                    t[side].append(consume_raw(bus, PATTERNS_MINE, n, f"{side}{k}", commit=False))
            kafka_fixes.install()
            bus.close()
            rows.append(stock_vs_fixed_row(comp, n, rounds, msg_bytes, t))
    return {"native_crc32c": native_crc32c(), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=10)
    add_allocator_option(ap)
    args = ap.parse_args()
    res = {"allocator_tuned": tune_allocator(args), **run(args.messages, args.rounds)}
    print(table(res["rows"], [c for c in res["rows"][0] if not c.endswith("seconds")]))
    print(f"us_cpu_msg: this process's CPU a message, median of {args.rounds} rounds; cpu_ / busy_fixed_stock: "
          f"the process's / the machine's CPU-seconds, fixed over stock, median of paired rounds (95% interval; "
          f"below 1: saved); rate_fixed_stock: messages/s, fixed over stock (above 1: faster)")
    print("wrote", write_result("consume_path", res))


if __name__ == "__main__":
    main()
