"""Produce and consume throughput of pattern-sized messages through the embedded broker.

Our adapter (apmae envelope + Bus.send / the at-least-once Processor loop with commits)
against the raw kafka-python client on the same broker, the same payloads, in the same run;
with and without compression. Messages: one 256x256 attention pattern each, lower triangle
in bfloat16 (32,896 values x 2 bytes), drawn from softmax rows like real attention.

    python benchmarks/bus.py [--messages 1500]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import embedded_infra, table, write_result


def patterns(n: int, size: int = 256) -> list[bytes]:
    from apmae.codec import encode_pattern

    g = np.random.default_rng(0)
    out = []
    for i in range(min(n, 64)):  # 64 distinct patterns, reused: generation is not what we time
        logits = g.normal(size=(size, size)) * (2 + i % 8)
        logits[np.triu_indices(size, 1)] = -np.inf
        e = np.exp(logits - logits.max(1, keepdims=True))
        out.append(encode_pattern(e / e.sum(1, keepdims=True)))
    return [out[i % len(out)] for i in range(n)]


def run(n: int) -> dict:
    from kafka import KafkaConsumer, KafkaProducer

    from apmae.config import BusConfig
    from apmae.topics import PATTERNS_MINE, PatternRecord
    from services.bus import Bus, Output, Processor

    payloads = patterns(n)
    rows = []
    with embedded_infra(("broker",)) as infra:
        for comp in ("none", "zstd", "lz4"):
            cfg = BusConfig(bootstrap_servers=infra.bootstrap_servers, compression=comp,
                            topic_prefix=f"{comp}.", group_poll_interval_ms=8000)
            bus = Bus(cfg, "bench")
            bus.ensure_topics([PATTERNS_MINE])
            raw_topic = f"raw.{comp}"
            bus.admin().create_topics([__import__("kafka.admin", fromlist=["NewTopic"]).NewTopic(raw_topic, 8, 1)])

            # raw kafka-python: produce
            rp = KafkaProducer(bootstrap_servers=infra.bootstrap_servers, acks="all", linger_ms=20,
                               batch_size=1 << 20, max_request_size=5 << 20,
                               compression_type=None if comp == "none" else comp)
            t0 = time.perf_counter()
            for i, p in enumerate(payloads):
                rp.send(raw_topic, key=f"m/{i % 30}/{i % 9}".encode(), value=p)
            rp.flush()
            raw_prod = time.perf_counter() - t0
            rp.close()

            # ours: produce (records with the envelope)
            recs = [PatternRecord(id=f"{i}", sample_id=f"s{i // 270}", model="m", task="random", layer=i % 30,
                                  head=i % 9, correct=True, size=256, payload=p) for i, p in enumerate(payloads)]
            t0 = time.perf_counter()
            for r in recs:
                bus.send(Output(PATTERNS_MINE, r, key=r.key))
            bus.flush()
            our_prod = time.perf_counter() - t0
            msg_bytes = len(__import__("apmae.messages", fromlist=["encode"]).encode(recs[0]))

            # raw kafka-python: consume with a group and commits per poll
            rc = KafkaConsumer(raw_topic, bootstrap_servers=infra.bootstrap_servers, group_id=f"raw-{comp}",
                               enable_auto_commit=False, auto_offset_reset="earliest", max_poll_interval_ms=8000,
                               session_timeout_ms=8000, heartbeat_interval_ms=1000, fetch_max_bytes=64 << 20,
                               max_partition_fetch_bytes=5 << 20)
            got, t0, first = 0, time.perf_counter(), None
            while got < n and time.perf_counter() - t0 < 300:
                batch = rc.poll(timeout_ms=500, max_records=256)
                if batch and first is None:
                    first = time.perf_counter()
                got += sum(len(v) for v in batch.values())
                if batch:
                    rc.commit()
            raw_cons = time.perf_counter() - (first or t0)
            rc.close()

            # ours: the Processor loop (decode + validate + flush + commit), no-op handler
            seen = []
            proc = Processor(bus, f"ours-{comp}", [PATTERNS_MINE], lambda ms, seen=seen: seen.extend(ms) or [], batch_size=256)
            t0 = time.perf_counter()
            proc.consumer = bus.consumer(proc.group, proc.inputs)
            while not proc.consumer.assignment() and time.perf_counter() - t0 < 60:
                proc.consumer.poll(timeout_ms=200, max_records=1)  # join the group before timing
                if seen or proc.consumer.assignment():
                    break
            proc.consumer.seek_to_beginning()
            t0 = time.perf_counter()
            proc.run(max_messages=n, idle_timeout_s=30)
            our_cons = time.perf_counter() - t0
            bus.close()
            mb = n * msg_bytes / 1e6
            rows.append({
                "compression": comp, "messages": n, "msg_bytes": msg_bytes,
                "raw_produce_msg_s": n / raw_prod, "ours_produce_msg_s": n / our_prod,
                "produce_ratio": raw_prod / our_prod, "ours_produce_MB_s": mb / our_prod,
                "raw_consume_msg_s": got / raw_cons, "ours_consume_msg_s": len(seen) / our_cons,
                "consume_ratio": (len(seen) / our_cons) / (got / raw_cons), "ours_consume_MB_s": mb / our_cons,
            })
    return {"rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=1500)
    args = ap.parse_args()
    res = run(args.messages)
    print(table(res["rows"], list(res["rows"][0])))
    print("ratio = ours / raw kafka-python (1.0 = no adapter overhead)")
    print("wrote", write_result("bus", res))


if __name__ == "__main__":
    main()
