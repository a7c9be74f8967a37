"""What Kafka record headers cost kafka-python's send loop (issue #14).

``Bus.send`` adds two record headers, ``id`` and ``schema``, to every message; both are also
in the envelope's head, where every reader takes them from. The bus benchmark's wall clock
could not see a cost (0.98, 0.93-1.09, 2026-12-03); this looks at the send loop's thread CPU,
which a diagnostic run put at 1.39x (1.02-1.49) with the headers (2026-12-06, not repeated
here: see NOTES-session20).

Method: raw kafka-python, the same envelope values and keys (pattern messages of 65.9 KB,
uncompressed), with and without the two headers, on the embedded broker; ``--rounds`` paired
rounds, order alternating, a fresh producer and topic each. Per round: the loop thread's CPU
over the sends (``time.thread_time``) and the wall time from the first send to the flush's end.
The table gives with/without per round, median and distribution-free 95% interval.

    python benchmarks/record_headers.py [--messages 3000] [--rounds 12]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import embedded_infra, median_ci, table, write_result  # noqa: E402
from benchmarks.bus import pattern_records, patterns  # noqa: E402


def send_all(bootstrap: str, topic: str, keys, values, headers) -> tuple[float, float]:
    """(loop-thread CPU-seconds of the sends, wall seconds to the flush's end)."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=1 << 20,
                      max_request_size=5 << 20)
    p.send(topic, value=b"warm-up").get(30)  # metadata and connection before the clock
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for i, v in enumerate(values):
        p.send(topic, key=keys[i], value=v, headers=headers[i] if headers else None)
    cpu = time.thread_time() - cpu0
    p.flush()
    wall = time.perf_counter() - wall0
    p.close()
    return cpu, wall


def run(n: int, rounds: int) -> dict:
    from kafka.admin import KafkaAdminClient, NewTopic

    from apmae.messages import encode
    from apmae.topics import PATTERNS_MINE

    recs = pattern_records(patterns(n))
    values = [encode(r) for r in recs]
    keys = [r.key.encode() for r in recs]
    headers = [[("id", r.id.encode()), ("schema", r.SCHEMA.encode())] for r in recs]
    t: dict[str, list[tuple[float, float]]] = {"without": [], "with": []}
    with embedded_infra(("broker",)) as infra:
        admin = KafkaAdminClient(bootstrap_servers=infra.bootstrap_servers)
        for k in range(rounds):
            topics = {"without": f"plain{k}", "with": f"headers{k}"}
            admin.create_topics([NewTopic(x, PATTERNS_MINE.partitions, 1) for x in topics.values()])
            order = ["without", "with"] if k % 2 == 0 else ["with", "without"]
            for way in order:
                t[way].append(send_all(infra.bootstrap_servers, topics[way], keys, values,
                                       headers if way == "with" else None))
            admin.delete_topics(list(topics.values()))
        admin.close()
    rows = []
    for i, what in ((0, "send loop thread CPU"), (1, "wall to the flush")):
        m, lo, hi, cov = median_ci([w[i] / p[i] for p, w in zip(t["without"], t["with"], strict=True)])
        rows.append({"measure": what, "without_us_per_msg": statistics.median(p[i] for p in t["without"]) / n * 1e6,
                     "with_us_per_msg": statistics.median(w[i] for w in t["with"]) / n * 1e6,
                     "with_over_without": m, "ci": f"{lo:.2f}-{hi:.2f}", "coverage": round(cov, 3)})
    return {"messages": n, "rounds": rounds, "rows": rows,
            "seconds": {way: [[round(c, 4), round(w, 4)] for c, w in v] for way, v in t.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    res = run(args.messages, args.rounds)
    print(table(res["rows"], list(res["rows"][0])))
    print(f"with_over_without: per paired round (with headers / without), median of {args.rounds}; us_per_msg: "
          f"the rounds' medians")
    print("wrote", write_result("record_headers", res))


if __name__ == "__main__":
    main()
