"""Would a consumer on its own thread speed up the encoder? (issue #14, the step left after
session 11.)

The encoder's minimal loop, poll -> decode -> forward (no outputs, flushes, done marks or
commits), run two ways on the same broker topic: serially, and with the poll on its own
thread (a queue of 2 batches; the consumer is used by that thread only). Both against the raw
in-memory forward of the same model on the same patterns; small AP-MAE, 2048 patterns, batch
128, rounds alternating the order.

If the threaded loop is no faster than the serial one, rewriting the Processor's at-least-once
core around a consumer thread would buy nothing on this machine: the poll's CPU and the
forward's two torch threads share 2 cores either way.

    python benchmarks/poll_thread.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (  # noqa: E402
    add_allocator_option,
    embedded_infra,
    table,
    tune_allocator,
    write_result,
)
from benchmarks.bus import pattern_records, patterns  # noqa: E402

N, BATCH = 2048, 128


def run(rounds: int) -> list[dict]:
    import torch
    from kafka import TopicPartition

    from apmae.codec import packed_values, read_packed
    from apmae.config import BusConfig
    from apmae.mae import APMAE, variant
    from apmae.messages import decode
    from apmae.topics import PATTERNS_MINE, PatternRecord
    from services.bus import Bus, Output

    payloads = patterns(N)
    recs = pattern_records(payloads, "p")
    torch.manual_seed(0)
    model = APMAE(variant("small")).eval()
    packed = packed_values(read_packed(payloads, 256)[0])

    def raw(_bus) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for k in range(0, N, BATCH):
                model.embed(packed[k:k + BATCH])
        return time.perf_counter() - t0

    def consumer(bus):
        """A group-less consumer assigned every partition, at the beginning."""
        c = bus.consumer(None)
        name, parts = bus.name(PATTERNS_MINE), set()
        while not parts:  # metadata arrives after the first request
            c.topics()
            parts = c.partitions_for_topic(name) or set()
        c.assign([TopicPartition(name, p) for p in sorted(parts)])
        c.seek_to_beginning()
        return c

    def poll(c) -> list:
        return [r for part in c.poll(timeout_ms=500, max_records=BATCH).values() for r in part]

    def handle(raws: list) -> None:
        """What the encoder's handler does to a batch before its outputs."""
        got = [decode(r.value, PatternRecord) for r in raws]
        with torch.inference_mode():
            model.embed(packed_values(read_packed([g.payload for g in got], 256)[0]))

    def serial(bus) -> float:
        c, got, t0 = consumer(bus), 0, time.perf_counter()
        while got < N:
            raws = poll(c)
            if raws:
                handle(raws)
                got += len(raws)
        dt = time.perf_counter() - t0
        c.close()
        return dt

    def threaded(bus) -> float:
        c, ready = consumer(bus), queue.Queue(maxsize=2)

        def reader() -> None:
            got = 0
            while got < N:
                raws = poll(c)
                if raws:
                    ready.put(raws)
                    got += len(raws)

        t0 = time.perf_counter()
        thread = threading.Thread(target=reader, name="poll", daemon=True)
        thread.start()
        got = 0
        while got < N:
            raws = ready.get()
            handle(raws)
            got += len(raws)
        dt = time.perf_counter() - t0
        thread.join()
        c.close()
        return dt

    loops = {"raw forward": raw, "serial poll": serial, "poll thread": threaded}
    seconds: dict[str, list[float]] = {name: [] for name in loops}
    with embedded_infra(("broker",)) as infra:
        bus = Bus(BusConfig(bootstrap_servers=infra.bootstrap_servers, topic_prefix="pt."), "bench")
        bus.ensure_topics([PATTERNS_MINE])
        for r in recs:
            bus.send(Output(PATTERNS_MINE, r, key=r.key))
        bus.flush()
        raw(bus)  # warm-up
        for k in range(rounds):
            order = list(loops.items())
            for name, fn in order if k % 2 == 0 else order[::-1]:
                seconds[name].append(fn(bus))
        bus.close()
    base = statistics.median(seconds["raw forward"])
    return [{"loop": name, "patterns": N, "batch": BATCH, "rounds": rounds,
             "patterns_per_s": N / statistics.median(s), "vs_raw": base / statistics.median(s),
             "seconds": [round(x, 3) for x in s]} for name, s in seconds.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=4)
    add_allocator_option(ap)
    args = ap.parse_args()
    tuned = tune_allocator(args)
    rows = run(args.rounds)
    print(table(rows, list(rows[0])))
    print("vs_raw = the loop's patterns/s / the raw in-memory forward's (medians of the rounds)")
    print("wrote", write_result("poll_thread", {"allocator_tuned": tuned, "rows": rows}))


if __name__ == "__main__":
    main()
