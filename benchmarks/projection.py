"""Wall time of the paper's study at its own scale, from this project's measured stage rates.

Reads the benchmark results (nothing is re-measured here) and projects the StarCoder2-15B
run of the paper (sections 4-5): 72M training patterns (25% of the heads of correct
random-span predictions: 480 per sample), 110,000 mining samples (11 tasks x 10,000) with
all 1920 heads (211.2M patterns), per-head UMAP + HDBSCAN on ~110k points, one CatBoost
per task. For N units per stage it prints each stage's hours and marks the one that bounds
the run. Where a rate is an assumption rather than a measurement, the table says so.

    python benchmarks/projection.py [--units 1,8,32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import RESULTS, table, write_result

HEADS, LAYERS = 1920, 40
TRAIN_PATTERNS = 72_000_000
MINE_SAMPLES = 110_000
MSG_BYTES = 65_972  # one 256-token pattern with its envelope (benchmarks/bus.py)


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def stages() -> list[dict]:
    gpu, bus, cluster, clf = load("gpu"), load("bus"), load("cluster"), load("classifier")
    sc2 = next(r for r in gpu["producer"] if r["model"] == "sc2-15b")
    embed = next(r for r in gpu["apmae"] if r["stage"] == "encoder embed" and r["dtype"] == "bfloat16")
    train = next(r for r in gpu["apmae"] if r["stage"] == "trainer step" and r["dtype"] == "bfloat16")
    from apmae.topics import PATTERNS_MINE

    # the patterns' default codec, as a deployment runs it (rates are of uncompressed bytes)
    patterns_codec = next(r for r in bus["rows"] if r["compression"] == PATTERNS_MINE.codec)
    publish_mb_s = patterns_codec["ours_produce_MB_s"]
    consume_mb_s = patterns_codec["ours_consume_MB_s"]
    ours_110k = next(r for r in cluster["rows"] if r["pipeline"] == "ours" and r["n"] == 110_000)
    fit_720 = next(r for r in clf["fit"] if r["setting"] == "ours")
    mine_bytes = MINE_SAMPLES * HEADS * MSG_BYTES
    train_samples = TRAIN_PATTERNS / (HEADS // 4)
    wire_per_sample = HEADS * MSG_BYTES
    gpu_name = gpu["device"]
    return [
        {"stage": "produce, mining (GPU forward + capture + encode)", "unit": f"1 {gpu_name}",
         "work": f"{MINE_SAMPLES:,} samples", "unit_hours": MINE_SAMPLES / sc2["capture_encode_samples_s"] / 3600,
         "basis": f"{sc2['capture_encode_samples_s']:.1f} samples/s measured (SC2-15B shape, random bf16 weights)"},
        {"stage": "produce, training data (25% of heads)", "unit": f"1 {gpu_name}",
         "work": f"{train_samples:,.0f} correct samples", "unit_hours": train_samples / sc2["capture_encode_samples_s"] / 3600,
         "basis": "all-heads rate used (an upper bound: 25% capture is cheaper); more forwards where predictions are wrong"},
        {"stage": "publish (one kafka-python client per producer)", "unit": "1 client process",
         "work": f"{(mine_bytes + TRAIN_PATTERNS * MSG_BYTES) / 1e12:.1f} TB", "unit_hours":
         (mine_bytes + TRAIN_PATTERNS * MSG_BYTES) / (publish_mb_s * 1e6) / 3600,
         "basis": f"{publish_mb_s:.0f} MB/s ({PATTERNS_MINE.codec}) measured per client on a 2-core CPU, embedded broker; "
                  f"{wire_per_sample / 1e6:.0f} MB per mined sample"},
        {"stage": "encode (AP-MAE paper variant, bf16)", "unit": f"1 {gpu_name}",
         "work": f"{MINE_SAMPLES * HEADS / 1e6:.1f}M patterns", "unit_hours": MINE_SAMPLES * HEADS / embed["patterns_s"] / 3600,
         "basis": f"{embed['patterns_s']:,.0f} patterns/s measured; consuming needs "
                  f"{embed['patterns_s'] * MSG_BYTES / 1e6 / consume_mb_s:.1f} client processes at {consume_mb_s:.0f} MB/s"},
        {"stage": "train AP-MAE (paper variant, bf16, batch 60)", "unit": f"1 {gpu_name}",
         "work": f"{TRAIN_PATTERNS / 1e6:.0f}M patterns", "unit_hours": TRAIN_PATTERNS / train["patterns_s"] / 3600,
         "basis": f"{train['patterns_s']:,.0f} patterns/s measured on one GPU; DDP assumed to scale linearly (not measured)"},
        {"stage": "cluster (per-head UMAP + HDBSCAN, ours)", "unit": "1 two-core machine",
         "work": f"{HEADS} heads x 110k", "unit_hours": HEADS * ours_110k["cpu_s"] / 2 / 3600,
         "basis": f"{ours_110k['cpu_s']:.0f} CPU s per head at 110k measured; 2 heads at once per machine"},
        {"stage": "classify (CatBoost per task)", "unit": "1 two-core machine",
         "work": "10 tasks x 10k rows", "unit_hours": 10 * fit_720["fit_s"] * HEADS / fit_720["features"] / 3600,
         "basis": f"{fit_720['fit_s']:.0f} s at 720 heads measured, scaled linearly to 1920"},
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--units", default="1,8,32")
    args = ap.parse_args()
    units = [int(u) for u in args.units.split(",")]
    rows = stages()
    for r in rows:
        for n in units:
            r[f"hours_x{n}"] = r["unit_hours"] / n
    cols = ["stage", "unit", "work"] + [f"hours_x{n}" for n in units] + ["basis"]
    print(table(rows, cols))
    for n in units:
        b = max(rows, key=lambda r: r[f"hours_x{n}"])
        print(f"{n} units per stage: {b['stage']} bounds the run at {b[f'hours_x{n}']:.1f} h")
    print("wrote", write_result("projection", {"units": units, "rows": rows}))


if __name__ == "__main__":
    main()
