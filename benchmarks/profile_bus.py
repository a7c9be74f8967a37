"""Where the bus adapter's produce and consume time goes (issue #14): cProfile of ours and of
the raw kafka-python client on the same payloads, one codec, in one run. Prints the top
functions by own time for each side; writes nothing else (a profile, not a figure).

    python benchmarks/profile_bus.py [--messages 1500] [--compression none] [--top 18]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import embedded_infra  # noqa: E402
from benchmarks.bus import (  # noqa: E402
    consume_ours,
    consume_raw,
    pattern_records,
    patterns,
    produce_ours,
    produce_raw,
)


def profiled(label: str, fn, top: int) -> float:
    prof = cProfile.Profile()
    prof.enable()
    seconds = fn().wall
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    print(f"==== {label}: {seconds:.3f} s\n" + "\n".join(out.getvalue().splitlines()[4:]))
    return seconds


def main() -> None:
    from kafka.admin import NewTopic

    from apmae.config import BusConfig
    from apmae.topics import PATTERNS_MINE
    from services.bus import Bus

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=1500)
    ap.add_argument("--compression", default="none")
    ap.add_argument("--top", type=int, default=18)
    args = ap.parse_args()
    n, comp = args.messages, args.compression
    payloads = patterns(n)
    recs = pattern_records(payloads)
    with embedded_infra(("broker",)) as infra:
        cfg = BusConfig(bootstrap_servers=infra.bootstrap_servers, compression=comp, topic_prefix="prof.",
                        group_poll_interval_ms=8000)
        bus = Bus(cfg, "bench")
        bus.ensure_topics([PATTERNS_MINE])
        bus.admin().create_topics([NewTopic("raw.prof", PATTERNS_MINE.partitions, 1)])
        profiled("raw produce", lambda: produce_raw(infra.bootstrap_servers, "raw.prof", comp, payloads), args.top)
        profiled("ours produce", lambda: produce_ours(cfg, recs), args.top)
        profiled("raw consume", lambda: consume_raw(bus, PATTERNS_MINE, n, "raw-prof"), args.top)
        profiled("ours consume", lambda: consume_ours(bus, n, "ours-prof"), args.top)


if __name__ == "__main__":
    main()
