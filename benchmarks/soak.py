"""Soak: the embedded pipeline held at its measured capacity for minutes, nothing dropped.

Services run as processes from the CLI, as in production: ``produce`` (the tiny StarCoder2,
all heads of 2 layers mined), ``encode`` (a small AP-MAE) and ``assign`` is left out (it
needs fitted clusters; its cost is measured in benchmarks/cluster.py). The script:

1. calibrates: floods 40 files and measures how fast the producer drains them (files/s);
2. soaks: feeds new, distinct files at that rate for ``--minutes``, sampling every 5 s the
   consumer lag of each stage (end offset - committed offset), and each service's RSS;
3. drains, stops the services with SIGTERM, and accounts by id: every file has its samples,
   every mined pattern one embedding; dropped = inputs without an output (must be 0).

    python benchmarks/soak.py [--minutes 4]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._common import embedded_infra, table, write_result  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def lag(bus, group: str, topic) -> int:
    """End offsets minus the group's committed offsets, summed over partitions."""
    from services.bus import topic_end_offsets

    ends = topic_end_offsets(bus, topic)
    c = bus.consumer(group, enable_auto_commit=False)  # never subscribes: reads the group's commits only
    try:
        return sum(max(0, end - (c.committed(tp) or 0)) for tp, end in ends.items())
    finally:
        c.close(autocommit=False)


def main() -> None:
    import redis
    import torch

    from apmae.config import BusConfig
    from apmae.mae import APMAE, save_pretrained, variant
    from apmae.tiny import SAMPLE_JAVA, save_tiny
    from apmae.topics import EMBEDDINGS, FILES, PATTERNS_MINE, SAMPLES
    from services.bus import Bus, Output, read_range
    from services.registry import apmae_key, sha256_file
    from tests.conftest import java_files

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=4.0)
    args = ap.parse_args()

    with embedded_infra() as infra:
        state = Path(infra.state_dir)
        cfg = BusConfig(bootstrap_servers=infra.bootstrap_servers, redis_url=infra.redis_url, state_dir=state,
                        topic_prefix="soak.")
        bus = Bus(cfg, "soak")
        bus.ensure_topics()
        model_dir = save_tiny(state / "tiny", [SAMPLE_JAVA] * 3)
        torch.manual_seed(0)
        ck = save_pretrained(APMAE(variant("small")), cfg.artifacts_dir / "soak-ck")
        redis.Redis.from_url(cfg.redis_url).hset(apmae_key(cfg.topic_prefix, "soak"), mapping={
            "path": "soak-ck", "step": 1, "sha256": sha256_file(ck / "model.safetensors")})
        env = os.environ | {f"APMAE_{k.upper()}": str(v) for k, v in vars(cfg).items()}
        procs = {
            "producer": subprocess.Popen([sys.executable, "-m", "services.cli", "produce", "--model", str(model_dir),
                                          "--mine-per-task", "1000000", "--balance-slack", "1000000",
                                          "--noise-every", "0"], env=env, cwd=ROOT,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            "encoder": subprocess.Popen([sys.executable, "-m", "services.cli", "encode", "--checkpoint", "soak"],
                                        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        }
        files = iter(java_files(100_000, "soak"))
        sent: list[str] = []

        def send(n: int) -> None:
            for _ in range(n):
                f = next(files)
                bus.send(Output(FILES, f))
                sent.append(f.id)
            bus.flush()

        def processed_files() -> int:
            return len({m.record.file_id for m in read_range(bus, SAMPLES)})

        # 1. calibrate
        time.sleep(20)  # model loads, group joins
        send(40)
        t0 = time.monotonic()
        while processed_files() < 40 and time.monotonic() - t0 < 600:
            time.sleep(2)
        rate = 40 / (time.monotonic() - t0)
        print(f"calibrated producer capacity: {rate:.2f} files/s")

        # 2. soak at that rate
        samples, start_rss = [], {k: rss_mb(p.pid) for k, p in procs.items()}
        t_start = time.monotonic()
        next_sample, fed = t_start, 0.0
        while time.monotonic() - t_start < args.minutes * 60:
            due = (time.monotonic() - t_start) * rate - fed
            if due >= 1:
                send(int(due))
                fed += int(due)
            if time.monotonic() >= next_sample:
                samples.append({"t_s": round(time.monotonic() - t_start), "files_sent": len(sent),
                                "producer_lag": lag(bus, "producer", FILES),
                                "encoder_lag": lag(bus, "encoder", PATTERNS_MINE),
                                **{f"{k}_rss_mb": rss_mb(p.pid) for k, p in procs.items()}})
                print(samples[-1], flush=True)
                next_sample += 5
            time.sleep(0.2)
        soak_s = time.monotonic() - t_start

        # 3. drain, stop, account
        t0 = time.monotonic()
        while (lag(bus, "producer", FILES) or lag(bus, "encoder", PATTERNS_MINE)) and time.monotonic() - t0 < 900:
            time.sleep(3)
        drain_s = time.monotonic() - t0
        end_rss = {k: rss_mb(p.pid) for k, p in procs.items()}
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(60)
        sample_recs = [m.record for m in read_range(bus, SAMPLES)]
        mined = {m.record.id: m.record for m in read_range(bus, PATTERNS_MINE)}
        embedded = [m.record for m in read_range(bus, EMBEDDINGS)]
        emb_keys = {(e.sample_id, e.layer, e.head) for e in embedded}
        missing_files = set(sent) - {s.file_id for s in sample_recs}
        missing_patterns = [p for p in mined.values() if (p.sample_id, p.layer, p.head) not in emb_keys]
        result = {
            "minutes": args.minutes, "rate_files_per_s": rate, "files_in": len(set(sent)),
            "samples": len({s.id for s in sample_recs}), "patterns_mined": len(mined),
            "embeddings": len({e.id for e in embedded}),
            "samples_per_s": len({s.id for s in sample_recs}) / (soak_s + drain_s),
            "patterns_per_s": len(mined) / (soak_s + drain_s),
            "max_producer_lag": max(s["producer_lag"] for s in samples),
            "max_encoder_lag": max(s["encoder_lag"] for s in samples), "drain_s": drain_s,
            "rss_start_mb": start_rss, "rss_end_mb": end_rss,
            "dropped_files": len(missing_files), "dropped_patterns": len(missing_patterns),
            "raw_duplicate_samples": len(sample_recs) - len({s.id for s in sample_recs}),
        }
        print(table([{k: v for k, v in result.items() if not isinstance(v, dict)}],
                    [k for k, v in result.items() if not isinstance(v, dict)]))
        print("RSS MB start -> end:", {k: f"{start_rss[k]:.0f} -> {end_rss[k]:.0f}" for k in procs})
        print("wrote", write_result("soak", {**result, "timeline": samples}))


if __name__ == "__main__":
    main()
