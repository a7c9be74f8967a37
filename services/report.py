"""The demo's report: one HTML page with every figure and the numbers behind them."""

from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from apmae import evaluate as E
from apmae.codec import decode_pattern, log_scale
from apmae.figures import cluster_examples, layer_head_heatmap
from apmae.mae import load
from apmae.topics import ASSIGNMENTS, PATTERNS_MINE, head_key
from services.bus import Bus, Message, read_range
from services.registry import Registry, safe_name


def _table(rows: list[dict], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = ""
    for r in rows:
        cells = "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols)
        body += f"<tr>{cells}</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v)


def _interval(ci) -> str:
    return "" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def write_report(demo) -> Path:
    out = demo.dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    bus = Bus(demo.bus, "report")
    done = demo.done
    numbers: dict = {}
    sections: list[str] = []

    # --- patterns (a bounded sample) and the AP-MAE checkpoint --------------------------------
    patterns, meta = [], []
    for m in read_range(bus, PATTERNS_MINE):
        if isinstance(m, Message):
            patterns.append(m.record)
        if len(patterns) >= 4000:
            break
    import redis

    from services.registry import apmae_key

    reg = redis.Redis.from_url(demo.bus.redis_url).hgetall(apmae_key(demo.bus.topic_prefix, "demo"))
    model, meta = load(demo.bus.artifacts_dir / reg[b"path"].decode())
    rng = np.random.default_rng(0)
    pick = rng.choice(len(patterns), min(400, len(patterns)), replace=False)
    x = torch.from_numpy(np.stack([decode_pattern(patterns[i].payload, patterns[i].size, patterns[i].dtype)
                                   for i in pick]))
    half = len(x) // 2
    losses = E.reconstruction_losses(model, x[half:])
    base = E.mean_patch_losses(model, x[:half], x[half:])
    numbers["reconstruction"] = {"apmae": E.summary(losses), "mean_patch_baseline": E.summary(base),
                                 "ratio_apmae_to_baseline": float(losses.mean() / base.mean()),
                                 "checkpoint_step": meta.get("step")}
    E.figure1(model, x[half], out / "figure1.png")
    sections.append("<h2>AP-MAE reconstruction (Figure 1)</h2><img src='figure1.png'>"
                    f"<p>Masked-patch MSE on {len(losses)} held-out mining patterns: "
                    f"{losses.mean():.4f} &plusmn; {losses.std():.4f}; predicting the mean patch: "
                    f"{base.mean():.4f} &plusmn; {base.std():.4f} (ratio {numbers['reconstruction']['ratio_apmae_to_baseline']:.2f}).</p>")

    # --- clusters per head (Figure 3) and examples per cluster (Figure 2) ----------------------
    registry = Registry(redis.Redis.from_url(demo.bus.redis_url), demo.bus.topic_prefix)
    per_head = {}
    for key in registry.names("cluster"):
        e = registry.get("cluster", key)
        _, layer, head = key.rsplit("/", 2)
        per_head[(int(layer), int(head))] = int(e["n_clusters"])
    prod = done.get("produce", {})
    if per_head:
        n_layers = 1 + max(k[0] for k in per_head)
        n_heads = 1 + max(k[1] for k in per_head)
        layer_head_heatmap(per_head, n_layers, n_heads, "clusters per head (unmined layers blank)",
                           out / "figure3.png", "clusters")
        numbers["clusters_per_head"] = {f"L{k[0]}H{k[1]}": v for k, v in sorted(per_head.items())}
        best = max(per_head, key=per_head.get)
        model_name = patterns[0].model
        cluster_of = {}
        for m in read_range(bus, ASSIGNMENTS):
            r = getattr(m, "record", None)
            if r is not None and (r.layer, r.head) == best:
                cluster_of[r.sample_id] = r.cluster
        examples: dict[int, list] = defaultdict(list)
        for p in patterns:
            if (p.layer, p.head) == best and p.sample_id in cluster_of and len(examples[cluster_of[p.sample_id]]) < 5:
                a = decode_pattern(p.payload, p.size, p.dtype)
                examples[cluster_of[p.sample_id]].append(log_scale(a).numpy())
        if examples:
            cluster_examples(dict(examples), f"{head_key(model_name, *best)}: example patterns per cluster",
                             out / "figure2.png")
        sections.append("<h2>Clusters per head (Figure 3)</h2><img src='figure3.png'>"
                        f"<h2>Patterns per cluster, head L{best[0]}H{best[1]} (Figure 2)</h2><img src='figure2.png'>")

    # --- classifier (Figures 4-6) --------------------------------------------------------------
    rows = []
    for model_name, m in done.get("classify", {}).get("models", {}).items():
        for t in m["tasks"]:
            rows.append({"model": model_name, "task": t["task"], "n": t.get("n"), "LLM correct": t.get("llm_correct_rate"),
                         "CV accuracy": t.get("mean"), "95% CI": _interval(t.get("ci95")),
                         "chance level": t.get("chance_level"),
                         "top head": next(iter(t.get("top_heads", {})), None), "skipped": t.get("skipped")})
        sections.append(f"<h2>Correctness classifier, {html.escape(model_name)} (Figure 4)</h2>"
                        f"<img src='accuracy-{safe_name(model_name)}.png'>")
    sections.append(_table(rows, ["model", "task", "n", "LLM correct", "CV accuracy", "95% CI", "chance level",
                                  "top head", "skipped"]))
    for png in sorted(out.glob("shap-*.png")):
        sections.append(f"<h3>{html.escape(png.stem)} (Figures 5-6)</h3><img src='{png.name}'>")

    # --- head intervention ---------------------------------------------------------------------
    iv = done.get("intervene", {})
    if iv.get("summary"):
        numbers["intervene"] = iv
        sections.append(f"<h2>Head intervention: {iv['k']} heads zeroed per task</h2><img src='intervene.png'>"
                        "<p>Change in the target model's correctness rate on held-out files when the task's "
                        "top-SHAP heads, random heads (mean of draws) or the most neutral heads are zeroed.</p>"
                        + _table(iv["summary"], ["task", "n", "correct_rate", "top", "random_mean", "random_std",
                                                 "neutral"]))

    # --- pipeline numbers ------------------------------------------------------------------------
    pred_rows = [{"task": t, **c} for t, c in sorted(prod.get("predictions", {}).items())]
    timing_rows = [{"stage": s, "seconds": v} for s, v in done.get("_timings", {}).items()]
    live = done.get("live", {})
    numbers.update({"timings": done.get("_timings"), "predictions": prod.get("predictions"), "live": live,
                    "train": done.get("train"), "cluster": done.get("cluster")})
    (out / "numbers.json").write_text(json.dumps(numbers, indent=2, default=str))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>apmae demo report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}img{{max-width:100%}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}
th{{background:#f3f3f3}}</style></head><body>
<h1>apmae demo report</h1>
<p>Target model <b>{html.escape(str(prod.get('model')))}</b> ({html.escape(str(prod.get('mode')))} mode,
{prod.get('heads_per_sample')} heads per sample, {prod.get('mined_heads')} mined) on
{done.get('ingest', {}).get('published')} files of {html.escape(str(demo.cfg.corpus or 'the JDK src.zip'))}.
The JDK sources are likely in the model's training data: correctness rates are inflated.</p>
<h2>Stages</h2>{_table(timing_rows, ["stage", "seconds"])}
<h2>Target model predictions per task</h2>{_table(pred_rows, ["task", "correct", "incorrect", "unlabelled"])}
{''.join(sections)}
<h2>Live stream</h2><p>{live.get('ingested')} new files: {live.get('embedded')} patterns embedded,
{live.get('scores')} samples scored in all, live accuracy {_fmt(live.get('live_accuracy'))}.</p>
<p>All numbers: <a href="numbers.json">numbers.json</a></p></body></html>"""
    path = out / "index.html"
    path.write_text(page)
    return path
