"""The producer on the local default model (SmolLM2-135M, CPU): capture cost and end to end.

Part 1, same inputs, same process, one mode at a time in a fresh subprocess (for peak RSS):
  sdpa      forward pass with no capture (the floor)
  capture25 our SDPA + selected-heads capture, a fresh 25% of heads per layer (training)
  capture   our capture of all heads (mining)
  eager     transformers' eager attention with output_attentions=True (the reference way)
plus the max abs difference between our all-heads capture and eager's probabilities.

Part 2, end to end through the embedded broker and Redis: ingest JDK files, run the producer
service loop, report samples/s, patterns/s, MB/s, the share of time spent publishing, the
correctness rate per task, and how well real patterns compress with zstd.

    python benchmarks/producer.py [--inputs 32] [--files 4]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._common import embedded_infra, table, write_result  # noqa: E402

CACHE = ROOT / ".apmae" / "models"


def build_inputs(lm, n: int):
    from apmae.corpus import CorpusStats, default_jdk_corpus, open_corpus
    from apmae.inputs import InputBuilder, Rejected
    from apmae.tasks import mine_spans, sample_spans

    b = InputBuilder(lm.tok, "prefix")
    xs = []
    for f in itertools.islice(open_corpus(default_jdk_corpus(), CorpusStats()), 300, None):
        tf = b.tokenize(f.content)
        for s in sample_spans(mine_spans(f.content.encode()), 1, f.id):
            x = b.build(tf, s)
            if not isinstance(x, Rejected):
                xs.append(x)
        if len(xs) >= n:
            return xs[:n]
    return xs


def one_mode(mode: str, n: int, batch: int) -> dict:
    """Runs in a subprocess: time one capture mode over the same inputs; report peak RSS."""
    import resource

    import torch

    from apmae.capture import random_heads
    from apmae.target import TargetModel

    torch.manual_seed(0)
    lm = TargetModel.load("local:smollm2", CACHE, "cpu")
    xs = build_inputs(lm, n)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    g = torch.Generator().manual_seed(0)
    diff = None
    t0 = time.perf_counter()
    for k in range(0, len(xs), batch):
        chunk = xs[k:k + batch]
        b = len(chunk)
        if mode == "eager":
            lm.model.set_attn_implementation("eager")
            ids = torch.tensor([list(x.input_ids) for x in chunk])
            with torch.no_grad():
                out = lm.model(input_ids=ids, output_attentions=True, use_cache=False)
            out.logits[:, -1].argmax(-1)
            continue
        if mode == "sdpa":
            heads = {}
        elif mode == "capture25":
            heads = {layer: torch.stack([random_heads(lm.n_heads, 0.25, g) for _ in range(b)])
                     for layer in range(lm.n_layers)}
        else:
            heads = {layer: torch.arange(lm.n_heads).expand(b, -1) for layer in range(lm.n_layers)}
        lm.run(chunk, heads)
    seconds = time.perf_counter() - t0
    if mode == "capture":  # equality with eager on the first batch (not timed)
        chunk = xs[:batch]
        heads = {layer: torch.arange(lm.n_heads).expand(len(chunk), -1) for layer in range(lm.n_layers)}
        ours = lm.run(chunk, heads).patterns
        lm.model.set_attn_implementation("eager")
        with torch.no_grad():
            ref = lm.model(input_ids=torch.tensor([list(x.input_ids) for x in chunk]), output_attentions=True,
                           use_cache=False).attentions
        diff = max((ours[layer] - ref[layer]).abs().max().item() for layer in range(lm.n_layers))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "inputs": len(xs), "seconds": seconds, "inputs_per_s": len(xs) / seconds,
            "peak_rss_MB": peak / 1024, "rss_growth_MB": (peak - rss0) / 1024, "max_abs_diff_vs_eager": diff}


def part1(n: int, batch: int) -> list[dict]:
    rows = []
    for mode in ("sdpa", "capture25", "capture", "eager"):
        out = subprocess.run([sys.executable, __file__, "--one-mode", mode, "--inputs", str(n), "--batch", str(batch)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["seconds"]
    eager = rows[-1]["seconds"]
    for r in rows:
        r["vs_sdpa"] = r["seconds"] / base
        r["vs_eager"] = r["seconds"] / eager
    return rows


def part2(files: int, mine_per_task: int) -> dict:
    import zstandard

    from apmae.config import BusConfig
    from apmae.corpus import CorpusStats, default_jdk_corpus, open_corpus
    from apmae.topics import FILES, PATTERNS_MINE, FileRecord
    from services import metrics
    from services.bus import Bus, Output, read_range
    from services.producer import PREDICTIONS, Producer, ProducerConfig

    with embedded_infra(("broker", "redis")) as infra:
        cfg = ProducerConfig(bootstrap_servers=infra.bootstrap_servers, redis_url=infra.redis_url,
                             state_dir=ROOT / ".apmae", group_poll_interval_ms=10_000, mine_per_task=mine_per_task,
                             balance_slack=mine_per_task)
        bus = Bus(BusConfig(bootstrap_servers=infra.bootstrap_servers), "bench")
        bus.ensure_topics()
        for f in itertools.islice(open_corpus(default_jdk_corpus(), CorpusStats()), 500, 500 + files):
            bus.send(Output(FILES, FileRecord(id=f.id, source=f.source, path=f.path, content=f.content)))
        bus.flush()
        prod = Producer(cfg)
        proc = prod.processor_for()
        t0 = time.perf_counter()
        proc.run(max_messages=files, idle_timeout_s=60)
        total = time.perf_counter() - t0
        publish = metrics.PUBLISH_SECONDS.labels("producer")._value.get()
        sec = {s: prod_seconds(s) for s in ("model", "capture", "encode")}
        counts = Counter()
        by_task: dict[str, Counter] = {}
        for sample in PREDICTIONS.collect()[0].samples:
            if sample.name.endswith("_total"):
                t, r = sample.labels["task"], sample.labels["result"]
                by_task.setdefault(t, Counter())[r] += int(sample.value)
                counts[r] += int(sample.value)
        n_samples = sum(counts.values())
        mine_bytes, n_patterns, ratios = 0, 0, []
        comp = zstandard.ZstdCompressor(level=3)
        for i, m in enumerate(read_range(bus, PATTERNS_MINE)):
            n_patterns += 1
            mine_bytes += len(m.value)
            if i % 50 == 0:
                ratios.append(len(m.record.payload) / len(comp.compress(m.record.payload)))
    per_task = [{"task": t, "correct": c["correct"], "incorrect": c["incorrect"], "unlabelled": c["unlabelled"],
                 "correct_rate": c["correct"] / max(1, c["correct"] + c["incorrect"])} for t, c in sorted(by_task.items())]
    return {"files": files, "samples": n_samples, "seconds": total, "samples_per_s": n_samples / total,
            "mined_patterns": n_patterns, "patterns_per_s": n_patterns / total, "MB_per_s": mine_bytes / 1e6 / total,
            "publish_share": publish / total, **{f"{k}_share": v / total for k, v in sec.items()},
            "zstd_ratio_real_patterns": sum(ratios) / max(1, len(ratios)), "per_task": per_task}


def prod_seconds(stage: str) -> float:
    from services.producer import SECONDS

    return SECONDS.labels(stage)._value.get()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--inputs", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--mine-per-task", type=int, default=6)
    ap.add_argument("--one-mode", default=None)
    args = ap.parse_args()
    if args.one_mode:
        print(json.dumps(one_mode(args.one_mode, args.inputs, args.batch)))
        return
    from apmae.target import materialize_smollm2

    materialize_smollm2(CACHE)
    rows = part1(args.inputs, args.batch)
    print(table(rows, ["mode", "inputs", "seconds", "inputs_per_s", "vs_sdpa", "vs_eager", "peak_rss_MB",
                       "rss_growth_MB", "max_abs_diff_vs_eager"]))
    e2e = part2(args.files, args.mine_per_task)
    print(table([{k: v for k, v in e2e.items() if k != "per_task"}],
                [k for k in e2e if k != "per_task"]))
    print(table(e2e["per_task"], ["task", "correct", "incorrect", "unlabelled", "correct_rate"]))
    print("wrote", write_result("producer", {"capture": rows, "end_to_end": e2e}))


if __name__ == "__main__":
    main()
