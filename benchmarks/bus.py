"""Produce and consume throughput of pattern-sized messages through the embedded broker.

Our adapter (apmae envelope + Bus.send / the at-least-once Processor loop with commits)
against the raw kafka-python client on the same broker, the same payloads, in the same run;
for each codec (none, zstd, lz4). Messages: one 256x256 attention pattern each, lower
triangle in bfloat16 (32,896 values x 2 bytes), drawn from softmax rows like real attention.

Method: for each codec, ``--rounds`` rounds; in each round raw and ours alternate (which goes
first alternates too), so drift of a noisy machine falls on both. Produce: ``--messages``
sends then a flush. Consume: both read the *same* topic (ours-produced, envelope and all)
with a fresh consumer group each; the group is joined before the clock starts, then the
clock runs from seek-to-beginning until every message is in hand and committed (raw: one
commit per poll; ours: the Processor's decode, done-check, flush and commit per batch).
Each round's ratio pairs ours with the raw run beside it; the table gives the median of those
paired ratios with a distribution-free 95% interval (order statistics, ``median_ci``). Beside
the wall-clock ratio, the CPU each side spent over the same clocked span, ours / raw (above 1:
the adapter costs more): this process's (every thread's: the client's IO thread too) and the
whole machine's busy CPU (the broker's too). A wall ratio under 1 with CPU ratios of 1 is the
machine's noise or waiting, not adapter work. Each
round's topics are deleted at its end, so the in-memory broker holds the same data in every
round (400 MB a round accumulated before).

    python benchmarks/bus.py [--messages 3000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (
    Clock,
    add_allocator_option,
    embedded_infra,
    median_ci,
    table,
    tune_allocator,
    write_result,
)


class Timed(NamedTuple):
    """One clocked span: wall seconds, this process's CPU-seconds (all threads), the
    machine's busy CPU-seconds (every process), and the CPU-seconds the host stole."""

    wall: float
    cpu: float
    busy: float
    steal: float


def _cpu_now() -> tuple[float, float, float]:
    return time.process_time(), Clock.busy(), Clock.steal()


def _timed(t0: float, c0: tuple[float, float, float]) -> Timed:
    c1 = _cpu_now()
    return Timed(time.perf_counter() - t0, *(b - a for a, b in zip(c0, c1, strict=True)))


def _cost_ratio(raw: list[Timed], ours: list[Timed], kind: str) -> tuple[float, float, float, float]:
    """``median_ci`` of ours' / raw's ``kind`` CPU-seconds per round. /proc/stat counts in
    ticks of 10 ms: a round whose raw side counted none has no ratio (left out)."""
    ratios = [getattr(o, kind) / getattr(r, kind) for r, o in zip(raw, ours, strict=True) if getattr(r, kind) > 0]
    return median_ci(ratios) if ratios else (float("nan"),) * 4


def round_seconds(t: dict[str, list[Timed]]) -> dict[str, dict[str, list[float]]]:
    """Every round's wall, process CPU, busy and steal seconds, by side: the JSON's raw data."""
    return {key: {name: [round(getattr(x, field), 3) for x in v] for name, v in t.items()}
            for key, field in (("seconds", "wall"), ("cpu_seconds", "cpu"),
                               ("busy_cpu_seconds", "busy"), ("steal_cpu_seconds", "steal"))}


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


def pattern_records(payloads: list[bytes], id_prefix: str = "") -> list:
    """The payloads as PatternRecords of one model's 30 x 9 heads, 270 to a sample."""
    from apmae.topics import PatternRecord

    return [PatternRecord(id=f"{id_prefix}{i}", sample_id=f"s{i // 270}", model="m", task="random", layer=i % 30,
                          head=i % 9, correct=True, size=256, payload=p) for i, p in enumerate(payloads)]


def _joined(consumer, timeout_s: float = 60.0):
    """Poll (fetching at most one record) until the group has assigned partitions."""
    t0 = time.perf_counter()
    while not consumer.assignment() and time.perf_counter() - t0 < timeout_s:
        consumer.poll(timeout_ms=200, max_records=1)
    consumer.seek_to_beginning()
    return consumer


def produce_raw(bootstrap: str, topic: str, comp: str, payloads: list[bytes]) -> Timed:
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=1 << 20,
                      max_request_size=5 << 20, compression_type=None if comp == "none" else comp)
    p.send(topic, value=b"warm-up").get(30)  # metadata and connection before the clock
    t0, c0 = time.perf_counter(), _cpu_now()
    for i, v in enumerate(payloads):
        p.send(topic, key=f"m/{i % 30}/{i % 9}".encode(), value=v)
    p.flush()
    span = _timed(t0, c0)
    p.close()
    return span


def produce_ours(cfg, records) -> Timed:
    from apmae.topics import PATTERNS_MINE
    from services.bus import Bus, Output

    bus = Bus(cfg, "bench")
    warm = dataclasses.replace(records[0], id="warm-up")  # its own id: the loop drops repeated ids
    bus.send(Output(PATTERNS_MINE, warm, key=warm.key))  # warm-up, as for raw
    bus.flush()
    t0, c0 = time.perf_counter(), _cpu_now()
    for r in records:
        bus.send(Output(PATTERNS_MINE, r, key=r.key))
    bus.flush()
    span = _timed(t0, c0)
    bus.close()
    return span


def consume_raw(bus, topic, n: int, group: str, commit: bool = True) -> Timed:
    """kafka-python's consumer as it comes (made by Bus.consumer only for the same settings);
    ``commit=False`` leaves the commits out (the consume path alone)."""
    c = _joined(bus.consumer(group, [topic]))
    got, t0, c0 = 0, time.perf_counter(), _cpu_now()
    while got < n and time.perf_counter() - t0 < 300:
        batch = c.poll(timeout_ms=500, max_records=256)
        got += sum(len(v) for v in batch.values())
        if batch and commit:
            c.commit()
    span = _timed(t0, c0)
    c.close(autocommit=False)
    assert got >= n, f"raw consumer got {got} of {n}"
    return span


def consume_ours(bus, n: int, group: str) -> Timed:
    from apmae.topics import PATTERNS_MINE
    from services.bus import Processor

    seen = [0]

    def handler(ms):
        seen[0] += len(ms)
        return []

    proc = Processor(bus, group, [PATTERNS_MINE], handler, batch_size=256)
    proc.consumer = _joined(bus.consumer(group, [PATTERNS_MINE]))
    done: list = [0, None]

    def progress(k: int) -> None:  # the clock stops at the commit of the last message, as for raw
        done[0] += k
        if done[0] >= n and done[1] is None:
            done[1] = _timed(t0, c0)

    t0, c0 = time.perf_counter(), _cpu_now()
    proc.run(max_messages=n, idle_timeout_s=30, progress=progress)
    assert seen[0] >= n and done[1] is not None, f"our processor got {seen[0]} of {n}"
    return done[1]


def codec_cpu(payloads: list[bytes], batch: int = 64, repeats: int = 20) -> list[dict]:
    """One core's CPU per pattern for each codec, on batches of ``batch`` patterns as the
    client compresses a record batch: what a CPU-bound producer pays to send a pattern and a
    consumer to read it, beside the bytes it saves (min of 3 timings)."""
    import lz4.frame
    import zstandard

    raw = b"".join(payloads[:batch])
    codecs = {"zstd": (zstandard.ZstdCompressor().compress, zstandard.ZstdDecompressor().decompress),
              "lz4": (lz4.frame.compress, lz4.frame.decompress)}
    rows = []
    for name, (pack, unpack) in codecs.items():
        blob = pack(raw)
        times = {}
        for what, fn, arg in (("compress", pack, raw), ("decompress", unpack, blob)):
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(repeats):
                    fn(arg)
                best = min(best, (time.perf_counter() - t0) / repeats / batch)
            times[what] = best * 1e6
        rows.append({"codec": name, "ratio": len(raw) / len(blob), "compress_us_per_pattern": times["compress"],
                     "decompress_us_per_pattern": times["decompress"]})
    return rows


def run(n: int, rounds: int) -> dict:
    from kafka.admin import NewTopic

    from apmae.config import BusConfig
    from apmae.messages import encode
    from apmae.topics import PATTERNS_MINE
    from services.bus import Bus, native_crc32c

    payloads = patterns(n)
    recs = pattern_records(payloads)
    msg_bytes = len(encode(recs[0]))
    rows = []
    with embedded_infra(("broker",)) as infra:
        for comp in ("none", "zstd", "lz4"):
            t = {"raw_produce": [], "ours_produce": [], "raw_consume": [], "ours_consume": []}
            for k in range(rounds):
                cfg = BusConfig(bootstrap_servers=infra.bootstrap_servers, compression=comp,
                                topic_prefix=f"{comp}{k}.", group_poll_interval_ms=8000)
                bus = Bus(cfg, "bench")
                bus.ensure_topics([PATTERNS_MINE])
                raw_topic = f"raw.{comp}{k}"
                bus.admin().create_topics([NewTopic(raw_topic, PATTERNS_MINE.partitions, 1)])
                steps = [("raw_produce", partial(produce_raw, infra.bootstrap_servers, raw_topic, comp, payloads)),
                         ("ours_produce", partial(produce_ours, cfg, recs))]
                for name, fn in steps if k % 2 == 0 else steps[::-1]:
                    t[name].append(fn())
                steps = [("raw_consume", partial(consume_raw, bus, PATTERNS_MINE, n, f"raw{k}")),
                         ("ours_consume", partial(consume_ours, bus, n, f"ours{k}"))]
                for name, fn in steps if k % 2 == 0 else steps[::-1]:
                    t[name].append(fn())
                admin = bus.admin()
                admin.delete_topics([raw_topic, bus.name(PATTERNS_MINE)])
                admin.close()
                bus.close()
            med = {name: statistics.median(x.wall for x in v) for name, v in t.items()}
            mb = n * msg_bytes / 1e6
            # each round's own ratio (ours and raw ran back to back in it): the noise a ratio
            # from this machine carries is in their spread, hence the interval
            ci = {way: median_ci([r.wall / o.wall for r, o in zip(t[f"raw_{way}"], t[f"ours_{way}"], strict=True)])
                  for way in ("produce", "consume")}
            cpu = {f"{way}_{kind}_ours_raw": _cost_ratio(t[f"raw_{way}"], t[f"ours_{way}"], kind)
                   for way in ("produce", "consume") for kind in ("cpu", "busy")}
            rows.append({
                "compression": comp, "messages": n, "rounds": rounds, "msg_bytes": msg_bytes,
                "raw_produce_MB_s": mb / med["raw_produce"], "ours_produce_MB_s": mb / med["ours_produce"],
                "produce_ratio": ci["produce"][0], "produce_ci": f"{ci['produce'][1]:.2f}-{ci['produce'][2]:.2f}",
                "raw_consume_MB_s": mb / med["raw_consume"], "ours_consume_MB_s": mb / med["ours_consume"],
                "consume_ratio": ci["consume"][0], "consume_ci": f"{ci['consume'][1]:.2f}-{ci['consume'][2]:.2f}",
                "ci_coverage": round(ci["produce"][3], 3),
                "ours_consume_msg_s": n / med["ours_consume"],
                **{k: f"{m:.2f} ({lo:.2f}-{hi:.2f})" for k, (m, lo, hi, _) in cpu.items()},
                **round_seconds(t),
            })
    return {"native_crc32c": native_crc32c(), "rows": rows, "codec_cpu": codec_cpu(payloads)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=9)  # the fewest for a 95% interval of the median: 6
    add_allocator_option(ap)
    args = ap.parse_args()
    tuned = tune_allocator(args)
    res = {"allocator_tuned": tuned, **run(args.messages, args.rounds)}
    cols = [c for c in res["rows"][0] if not c.endswith("seconds")]
    print(table(res["rows"], cols))
    print(table(res["codec_cpu"], list(res["codec_cpu"][0])))
    print(f"*_ratio = ours' rate / raw kafka-python's (raw seconds / ours; below 1: ours is slower), median of "
          f"{args.rounds} paired rounds, ci: its distribution-free interval (coverage in ci_coverage); 1.0 = no "
          f"adapter overhead; *_cpu_ours_raw / *_busy_ours_raw: this process's / the machine's CPU-seconds over "
          f"the same span, ours / raw (a cost: above 1, ours spends more); steal in the JSON; "
          f"native crc32c: {res['native_crc32c']}")
    print("wrote", write_result("bus", res))


if __name__ == "__main__":
    main()
