"""Durable (Tansu s3:// on the local s3rver) vs in-memory embedded broker: produce and consume
MB/s of pattern-sized messages, and the durable one's read-back after ``infra down``/``up``.

    .venv/bin/python benchmarks/broker_storage.py [--messages 300] [--rounds 3]

Messages are 65.8 KB of random bytes (a 256-token bf16 pattern, incompressible like real ones),
uncompressed, through kafka-python as the services use it (acks=all, 1 MiB batches).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import table, write_result  # noqa: E402

SIZE = 256 * 257 // 2 * 2 + 400  # a bf16 pattern's payload plus its header


def measure(ephemeral: bool, n: int) -> dict:
    from apmae.config import BusConfig
    from services.bus import Bus, topic_end_offsets
    from services.infra import InfraConfig, down, free_port, up

    infra = InfraConfig(state_dir=Path(tempfile.mkdtemp(prefix="apmae-bench-storage-")), kafka_port=free_port(),
                        redis_port=free_port(), prometheus_port=free_port(), s3_port=free_port(), ephemeral=ephemeral)
    which = ("broker",)
    up(infra, which)
    try:
        cfg = BusConfig(bootstrap_servers=infra.bootstrap_servers, state_dir=infra.state_dir, compression="none")
        bus = Bus(cfg, "bench")
        name = "bench.storage"
        admin = bus.admin()
        from kafka.admin import NewTopic

        admin.create_topics([NewTopic(name, 1, 1)])
        admin.close()
        payloads = [os.urandom(SIZE) for _ in range(n)]
        t0 = time.perf_counter()
        futures = [bus.producer.send(name, value=v) for v in payloads]
        bus.producer.flush()
        assert all(f.succeeded() for f in futures)
        produce_s = time.perf_counter() - t0

        def consume() -> tuple[int, float]:
            c = bus.consumer(None, enable_auto_commit=False)
            from kafka import TopicPartition

            tp = TopicPartition(name, 0)
            c.assign([tp])
            c.seek(tp, 0)
            got, t = 0, time.perf_counter()
            while got < n:
                got += sum(len(r) for r in c.poll(timeout_ms=1000).values())
            c.close()
            return got, time.perf_counter() - t

        got, consume_s = consume()
        row = {"storage": "memory" if ephemeral else "durable (s3rver)", "messages": n,
               "produce_MBps": n * SIZE / produce_s / 1e6, "consume_MBps": n * SIZE / consume_s / 1e6}
        if not ephemeral:
            bus.close()
            down(infra, which)
            up(infra, which)
            bus = Bus(cfg, "bench")
            back = sum(topic_end_offsets(bus, name).values())
            got, _ = consume()
            row["after_down_up"] = f"{got} of {n} read back (end offset {back})"
        return row
    finally:
        down(infra, which)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for _ in range(args.rounds):  # alternating, so drift on the shared machine hits both alike
        for ephemeral in (True, False):
            rows.append(measure(ephemeral, args.messages))
    print(table(rows, ["storage", "messages", "produce_MBps", "consume_MBps", "after_down_up"]))
    print("wrote", write_result("broker_storage", {"message_bytes": SIZE, "rows": rows}))


if __name__ == "__main__":
    main()
