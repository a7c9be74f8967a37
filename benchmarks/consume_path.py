"""What services/bus/kafka_fixes.py saves: kafka-python's consumer as shipped vs with the fixes.

The same consumer (made by ``Bus.consumer``, the services' settings) reads the same pattern
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
from benchmarks.bus import Timed, _cpu_now, _joined, _timed, pattern_records, patterns


def consume(bus, topic, n: int, group: str) -> Timed:
    """Seek to the beginning and poll until ``n`` messages are in hand (no commits: the
    consume path alone)."""
    c = _joined(bus.consumer(group, [topic]))
    got, t0, c0 = 0, time.perf_counter(), _cpu_now()
    while got < n and time.perf_counter() - t0 < 300:
        got += sum(len(v) for v in c.poll(timeout_ms=500, max_records=256).values())
    span = _timed(t0, c0)
    c.close(autocommit=False)
    assert got >= n, f"consumer got {got} of {n}"
    return span


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
                    if side == "stock":
                        kafka_fixes.uninstall()
                    else:
                        assert kafka_fixes.install(), "the fixes did not install (APMAE_STOCK_KAFKA=1?)"
                    t[side].append(consume(bus, PATTERNS_MINE, n, f"{side}{k}"))
            kafka_fixes.install()
            bus.close()
            pairs = list(zip(t["stock"], t["fixed"], strict=True))
            cpu = median_ci([f.cpu / s.cpu for s, f in pairs])
            busy = median_ci([f.busy / s.busy for s, f in pairs if s.busy > 0])
            rate = median_ci([s.wall / f.wall for s, f in pairs])
            rows.append({
                "compression": comp, "messages": n, "rounds": rounds, "msg_bytes": msg_bytes,
                "stock_us_cpu_msg": statistics.median(x.cpu for x in t["stock"]) / n * 1e6,
                "fixed_us_cpu_msg": statistics.median(x.cpu for x in t["fixed"]) / n * 1e6,
                "cpu_fixed_stock": f"{cpu[0]:.2f} ({cpu[1]:.2f}-{cpu[2]:.2f})",
                "busy_fixed_stock": f"{busy[0]:.2f} ({busy[1]:.2f}-{busy[2]:.2f})",
                "stock_MB_s": n * msg_bytes / 1e6 / statistics.median(x.wall for x in t["stock"]),
                "fixed_MB_s": n * msg_bytes / 1e6 / statistics.median(x.wall for x in t["fixed"]),
                "rate_fixed_stock": f"{rate[0]:.2f} ({rate[1]:.2f}-{rate[2]:.2f})",
                "ci_coverage": round(cpu[3], 3),
                "seconds": {s: [round(x.wall, 3) for x in v] for s, v in t.items()},
                "cpu_seconds": {s: [round(x.cpu, 3) for x in v] for s, v in t.items()},
                "busy_cpu_seconds": {s: [round(x.busy, 3) for x in v] for s, v in t.items()},
                "steal_cpu_seconds": {s: [round(x.steal, 3) for x in v] for s, v in t.items()},
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
    print(f"us_cpu_msg: this process's CPU a message, median of {args.rounds} rounds; cpu_ / busy_fixed_stock: "
          f"the process's / the machine's CPU-seconds, fixed over stock, median of paired rounds (95% interval; "
          f"below 1: saved); rate_fixed_stock: messages/s, fixed over stock (above 1: faster)")
    print("wrote", write_result("consume_path", res))


if __name__ == "__main__":
    main()
