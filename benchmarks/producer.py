"""The producer on the local default model (SmolLM2-135M, CPU): capture cost and end to end.

Part 1, same inputs, same process, one mode at a time in a fresh subprocess (for peak RSS):
  sdpa      forward pass with no capture (the floor)
  capture25 our SDPA + selected-heads capture, a fresh 25% of heads per layer (training)
  capture   our capture of all heads (mining)
  eager     transformers' eager attention with output_attentions=True (the reference way)
plus the max abs difference between our all-heads capture and eager's probabilities.

Part 2, side by side on the same files and the same loaded model: a forward + capture loop
alone (the floor) against the producer service through the embedded broker and Redis
(pipelined: chunk k is encoded and published while chunk k+1 runs); samples/s of both,
their ratio, patterns/s, MB/s, the share of wall time per stage, the correctness rate per
task, and how well real patterns compress with zstd. Beside each span, where the cores went
(``cpu_split``): the main thread with torch's workers (the forward), the publisher thread,
the Kafka client's IO thread, other threads, the broker's and Redis's processes, each as a
share of every core; and the main thread's CPU in the service over the loop's for the same
forwards. ``--also-compression CODEC`` adds the service with that codec for every topic,
paired with the service as it ships (what the default codecs cost a CPU-bound producer).

    python benchmarks/producer.py [--inputs 32] [--files 4] [--skip-capture] [--rounds 6] [--also-compression none]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._common import (  # noqa: E402
    SHARES_LEGEND,
    Clock,
    add_allocator_option,
    cpu_bound,
    cpu_shares,
    cpu_split,
    embedded_infra,
    median_ci,
    server_processes,
    span,
    table,
    tune_allocator,
    watch_thread_ends,
    write_result,
)

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


def part1(n: int, batch: int, glibc_malloc: bool = False) -> list[dict]:
    rows = []
    for mode in ("sdpa", "capture25", "capture", "eager"):
        out = subprocess.run([sys.executable, __file__, "--one-mode", mode, "--inputs", str(n), "--batch", str(batch)]
                             + (["--glibc-malloc"] if glibc_malloc else []),
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["seconds"]
    eager = rows[-1]["seconds"]
    for r in rows:
        r["vs_sdpa"] = r["seconds"] / base
        r["vs_eager"] = r["seconds"] / eager
    return rows


def part2(files: int, rounds: int, also: str | None = None) -> dict:
    """The producer service against a forward + capture loop alone, same inputs, same model.

    Both run the same jobs (the service's own ``jobs_for`` on the same files) in chunks of
    ``batch_size`` with the same heads captured (``heads_to_capture``: all heads for mined
    samples, 25% for training ones); every mined sample is admitted (no task fills up), so
    the service does all the capture work the loop does, then encodes, publishes, flushes,
    marks and commits. The consumer group is joined before the service's clock starts.
    Rounds alternate which goes first."""
    import torch
    import zstandard

    from apmae.config import BusConfig, from_flat
    from apmae.corpus import CorpusStats, default_jdk_corpus, open_corpus
    from apmae.target import TargetModel
    from apmae.topics import FILES, PATTERNS_MINE, FileRecord
    from services.bus import Bus, Message, Output, read_range
    from services.producer import PREDICTIONS, Producer, ProducerConfig

    lm = TargetModel.load("local:smollm2", CACHE, "cpu")
    corpus = [FileRecord(id=f.id, source=f.source, path=f.path, content=f.content)
              for f in itertools.islice(open_corpus(default_jdk_corpus(), CorpusStats()), 500, 500 + files)]
    watch_thread_ends()  # before any thread starts: a thread that ends inside a span counts in its group
    with embedded_infra(("broker", "redis")) as infra:
        servers = server_processes(infra)

        def clocks() -> dict:
            return cpu_split(servers, thread_group)

        def config(k: int, compression: str = "auto") -> ProducerConfig:
            return from_flat(ProducerConfig, bootstrap_servers=infra.bootstrap_servers, redis_url=infra.redis_url,
                             state_dir=ROOT / ".apmae", group_poll_interval_ms=10_000,
                             topic_prefix=f"r{k}{'' if compression == 'auto' else compression}.",
                             mine_per_task=10**6, balance_slack=10**6, compression=compression)

        def loop_alone(k: int) -> tuple[float, int, float, dict[str, float]]:
            prod = Producer(config(k), model=lm)
            t_jobs = time.thread_time()  # building the inputs: the service's main thread does it inside its span
            batches = [[j for f in corpus[i:i + prod.cfg.files_per_batch]
                        for j in prod.jobs_for(Message("files", 0, 0, 0, None, b"", f))]
                       for i in range(0, len(corpus), prod.cfg.files_per_batch)]
            jobs_cpu[k] = time.thread_time() - t_jobs
            clock, c0 = Clock().start(), clocks()
            for jobs in batches:
                gen = torch.Generator().manual_seed(prod.cfg.seed)
                full = {j.x.task: False for j in jobs}
                for c in range(0, len(jobs), prod.cfg.batch_size):
                    chunk = jobs[c:c + prod.cfg.batch_size]
                    lm.run([j.x for j in chunk], prod.heads_to_capture(chunk, full, gen))
            wall, cpu = clock.stop()
            split = span(c0, clocks())
            prod.close()
            return wall, sum(len(b) for b in batches), cpu, split

        def service(k: int, compression: str = "auto") -> tuple[float, int, dict]:
            cfg = config(k, compression)
            bus = Bus(BusConfig(bootstrap_servers=infra.bootstrap_servers, topic_prefix=cfg.topic_prefix), "bench")
            bus.ensure_topics()
            for f in corpus:
                bus.send(Output(FILES, f))
            bus.flush()
            prod = Producer(cfg, model=lm)
            proc = prod.processor_for()
            proc.connect()
            while not proc.consumer.assignment():  # join the group before the clock
                proc.consumer.poll(timeout_ms=200, max_records=1)
            proc.consumer.seek_to_beginning()
            before = {s: prod_seconds(s) for s in STAGES}
            clock, c0 = Clock().start(), clocks()
            proc.run(max_messages=files, idle_timeout_s=60)
            total, cpu = clock.stop()
            split = span(c0, clocks())
            prod.close()  # its threads end here, not inside a later round's span
            stages = {s: prod_seconds(s) - before[s] for s in STAGES}
            n_mined, mined_bytes, ratios = 0, 0, []
            comp = zstandard.ZstdCompressor(level=3)
            for i, m in enumerate(read_range(bus, PATTERNS_MINE)):
                n_mined += 1
                mined_bytes += len(m.value)
                if i % 50 == 0:
                    ratios.append(len(m.record.payload) / len(comp.compress(m.record.payload)))
            bus.close()
            return total, n_mined, {"stages": stages, "mined_bytes": mined_bytes, "cpu": cpu, "split": split,
                                    "zstd_ratio": sum(ratios) / max(1, len(ratios))}

        jobs_cpu: dict[int, float] = {}
        lm.run(build_inputs(lm, 8), {})  # warm-up: first-forward allocations fall on neither
        runs = []
        for k in range(rounds):
            order = ["loop", "service"] + (["also"] if also else [])
            r = {}
            for what in order if k % 2 == 0 else order[::-1]:
                if what == "loop":
                    r["loop_s"], r["samples"], r["loop_cpu_s"], r["loop_split"] = loop_alone(k)
                elif what == "service":
                    r["service_s"], r["mined_patterns"], r["detail"] = service(k)
                else:
                    r["also_s"], _, detail = service(k, also)
                    r["also_split"] = detail["split"]
            r["service_split"], r["jobs_cpu_s"] = r["detail"]["split"], jobs_cpu[k]
            runs.append(r)
    samples = runs[0]["samples"]
    loop_s = sorted(r["loop_s"] for r in runs)[len(runs) // 2]
    service_s = sorted(r["service_s"] for r in runs)[len(runs) // 2]
    last = runs[-1]
    counts = Counter()
    by_task: dict[str, Counter] = {}
    for sample in PREDICTIONS.collect()[0].samples:
        if sample.name.endswith("_total"):
            t, res = sample.labels["task"], sample.labels["result"]
            by_task.setdefault(t, Counter())[res] += int(sample.value)
            counts[res] += int(sample.value)
    ratio, lo, hi, coverage = median_ci([r["loop_s"] / r["service_s"] for r in runs])

    def shares(key: str) -> dict[str, float]:
        return cpu_shares([r[key] for r in runs])

    main_vs, main_lo, main_hi, _ = median_ci([r["service_split"]["main"] / r["loop_split"]["main"] for r in runs])
    also_row = {}
    if also:  # the service again with one codec for every topic, paired with the service as it ships
        a_med, a_lo, a_hi, _ = median_ci([r["service_s"] / r["also_s"] for r in runs])
        v_med, v_lo, v_hi, _ = median_ci([r["loop_s"] / r["also_s"] for r in runs])
        also_row = {"also_compression": {
            "codec": also, "samples_per_s": samples / statistics.median(r["also_s"] for r in runs),
            "vs_service": a_med, "vs_service_ci": f"{a_lo:.3f}-{a_hi:.3f}",
            "vs_loop": v_med, "vs_loop_ci": f"{v_lo:.3f}-{v_hi:.3f}", "cpu_shares": shares("also_split")}}
    per_task = [{"task": t, "correct": c["correct"], "incorrect": c["incorrect"], "unlabelled": c["unlabelled"],
                 "correct_rate": c["correct"] / max(1, c["correct"] + c["incorrect"])} for t, c in sorted(by_task.items())]
    return {"files": files, "rounds": rounds, "samples": samples,
            "loop_alone_samples_per_s": samples / loop_s, "service_samples_per_s": samples / service_s,
            "service_vs_loop": loop_s / service_s,  # medians' ratio; the paired one below
            "paired_service_vs_loop": ratio, "ci": f"{lo:.3f}-{hi:.3f}", "ci_coverage": round(coverage, 3),
            # where the cores went (benchmarks/_common.cpu_split): shares of every core over
            # each span, and the main thread's CPU (the forward, torch's workers, and in the
            # service the loop's own work: inputs, polls, flushes, marks) over the loop's
            "loop_cpu_shares": shares("loop_split"), "service_cpu_shares": shares("service_split"),
            "main_cpu_vs_loop": main_vs, "main_cpu_vs_loop_ci": f"{main_lo:.3f}-{main_hi:.3f}",
            "jobs_cpu_share_of_loop_main": statistics.median(r["jobs_cpu_s"] / r["loop_split"]["main"] for r in runs),
            # busy cores of the whole machine (every process: the broker's and Redis's too) while
            # each ran, and the best ratio the service's own CPU-seconds allow on these cores
            "loop_cores_busy": statistics.median(r["loop_cpu_s"] / r["loop_s"] for r in runs),
            "service_cores_busy": statistics.median(r["detail"]["cpu"] / r["service_s"] for r in runs),
            "cpu_bound": cpu_bound(loop_s, [statistics.median(r["detail"]["cpu"] for r in runs)]),
            "mined_patterns_per_round": last["mined_patterns"], "patterns_per_s": last["mined_patterns"] / service_s,
            "MB_per_s": last["detail"]["mined_bytes"] / 1e6 / service_s,
            **{f"{k}_share": v / last["service_s"] for k, v in last["detail"]["stages"].items()},
            "zstd_ratio_real_patterns": last["detail"]["zstd_ratio"],
            **also_row,
            "seconds": [{k: v for k, v in r.items() if k != "detail"} for r in runs],
            # the predictions of every service run in this process (the loop's count none)
            "per_task_service_runs": rounds * (2 if also else 1), "per_task": per_task}


def thread_group(t) -> str:
    """The producer's Python threads, by what they do (``cpu_split``'s groups)."""
    if t.name.startswith("publish"):
        return "publisher"  # encodes patterns and hands them to the Kafka client
    if t.name == "producer-network-thread":
        return "producer_io"  # the service's kafka-python sender: batches, compression, checksums, sockets
    return "other_threads"  # the consumer's IO, the lag probe, the keepalive helper, the benchmark's own client


STAGES = ("model", "capture", "encode", "publish", "wait")


def prod_seconds(stage: str) -> float:
    from services.producer import SECONDS

    return SECONDS.labels(stage)._value.get()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--inputs", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-capture", action="store_true", help="only part 2")
    ap.add_argument("--also-compression", default=None, choices=("none", "lz4", "zstd", "gzip"),
                    help="part 2 also runs the service with this codec for every topic, paired with the default")
    ap.add_argument("--one-mode", default=None)
    add_allocator_option(ap)
    args = ap.parse_args()
    tuned = tune_allocator(args)
    if args.one_mode:
        print(json.dumps(one_mode(args.one_mode, args.inputs, args.batch)))
        return
    from apmae.target import materialize_smollm2

    materialize_smollm2(CACHE)
    rows = [] if args.skip_capture else part1(args.inputs, args.batch, args.glibc_malloc)
    if rows:
        print(table(rows, ["mode", "inputs", "seconds", "inputs_per_s", "vs_sdpa", "vs_eager", "peak_rss_MB",
                           "rss_growth_MB", "max_abs_diff_vs_eager"]))
    e2e = part2(args.files, args.rounds, args.also_compression)
    split_keys = ("per_task", "seconds", "loop_cpu_shares", "service_cpu_shares", "also_compression")
    print(table([{k: v for k, v in e2e.items() if k not in split_keys}], [k for k in e2e if k not in split_keys]))
    shares = [{"span": side, **e2e[f"{side}_cpu_shares"]} for side in ("loop", "service")]
    if "also_compression" in e2e:
        also = e2e["also_compression"]
        print(table([{k: v for k, v in also.items() if k != "cpu_shares"}], [k for k in also if k != "cpu_shares"]))
        shares.append({"span": f"service, {also['codec']}", **also["cpu_shares"]})
    print(table(shares, ["span", *sorted({k for r in shares for k in r} - {"span"})]))
    print(SHARES_LEGEND)
    print(table(e2e["per_task"], ["task", "correct", "incorrect", "unlabelled", "correct_rate"]))
    if not rows:  # keep the last capture measurement rather than dropping it from the result
        old = ROOT / "benchmarks" / "results" / "producer.json"
        rows = json.loads(old.read_text()).get("capture", []) if old.exists() else []
    print("wrote", write_result("producer", {"allocator_tuned": tuned, "capture": rows, "end_to_end": e2e}))


if __name__ == "__main__":
    main()
