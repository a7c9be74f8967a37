"""The demo's report: one HTML page with every figure and the numbers behind them."""

from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from apmae import evaluate as E
from apmae.codec import decode_pattern
from apmae.figures import (
    calibration_plot,
    cluster_examples,
    cluster_scatter,
    layer_head_heatmap,
    loss_curve,
)
from apmae.mae import from_pretrained
from apmae.scaling import log_scale
from apmae.topics import ASSIGNMENTS, PATTERNS_MINE, SCORES, head_key
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


def _warn(text: str) -> str:
    return f"<p class='warn'>&#9888; {text}</p>"


class _Sections:
    """Numbered report sections with anchors, for the table of contents."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, str]] = []

    def append(self, body: str, title: str | None = None, anchor: str | None = None) -> None:
        if title is None:  # continues the previous section
            a, t, b = self.items[-1]
            self.items[-1] = (a, t, b + body)
            return
        anchor = anchor or f"s{len(self.items) + 1}"
        self.items.append((anchor, title, body))

    def toc(self) -> str:
        links = "".join(f"<li><a href='#{a}'>{html.escape(t)}</a></li>" for a, t, _ in self.items)
        return f"<nav><h2>Contents</h2><ol>{links}</ol></nav>"

    def html(self) -> str:
        return "".join(f"<section id='{a}'><h2>{i}. {html.escape(t)}</h2>{SMOKE_TAG}{b}</section>"
                       for i, (a, t, b) in enumerate(self.items, 1))


# the demo is a smoke run: every section (so every number in it) says so and where the study's are
SMOKE_TAG = ("<p class='smoke'>Smoke run (demo scale): the numbers in this section show the machinery, they are "
             "not results; the study's numbers are in the repository's <code>docs/study/README.md</code> "
             "(<code>apmae study</code>).</p>")


def _umap_2d(points: np.ndarray) -> np.ndarray:
    """2-D UMAP of a head's fitted (8-d) points, for the scatter only."""
    import umap

    n = len(points)
    return umap.UMAP(n_components=2, n_neighbors=max(2, min(15, n - 1)), random_state=0,
                     init="random").fit_transform(points)


def _calibration(bus, out: Path) -> tuple[str, dict | None, int]:
    """Reliability diagram of the live scores whose truth is known and that the classifier was
    not fit on (in_sample is not True)."""
    prob, actual = [], []
    seen: set[str] = set()
    labelled = 0
    for m in read_range(bus, SCORES):
        r = getattr(m, "record", None)
        if r is None or r.id in seen or r.actual is None:
            continue
        seen.add(r.id)
        labelled += 1
        if getattr(r, "in_sample", None) is True:
            continue
        prob.append(r.prob_correct)
        actual.append(float(r.actual))
    if not prob:
        return "<p>No out-of-sample live score with a known truth yet: no calibration plot.</p>", None, labelled
    cal = calibration_plot(np.array(prob), np.array(actual), out / "calibration.png",
                           "Live scores: predicted P(correct) vs observed")
    note = ("<img src='calibration.png' alt='calibration plot'><p>Each point: the live scores in one "
            "bin of predicted P(correct), their observed correct rate and 95% Wilson interval; "
            f"bars: n per bin. Brier score {_fmt(cal['brier'])} over n = {cal['n']} out-of-sample "
            "scores (0.25 = always predicting 0.5).</p>")
    if cal["n"] < 50:
        note += _warn(f"Only {cal['n']} scores: the calibration estimate is rough.")
    return note, cal, labelled


def _live_accuracy(live: dict, n_labelled: int) -> str:
    """The demo's live accuracy with its n and interval (apmae.scoring.live_accuracy: only
    samples of files no classifier was fit on), else with the n of all labelled scores."""
    acc = live.get("live") if isinstance(live.get("live"), dict) else None
    if acc is not None:
        return (f"live accuracy {_fmt(acc.get('accuracy'))} (n = {acc.get('n')} scores of files no classifier "
                f"was fit on, 95% CI {_interval(acc.get('ci95'))})")
    return f"live accuracy {_fmt(live.get('live_accuracy'))} (n = {n_labelled} scores with a known truth)"


def write_report(demo) -> Path:
    out = demo.dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    bus = Bus(demo.bus, "report")
    done = demo.done
    numbers: dict = {}
    sections = _Sections()

    # --- patterns (a bounded sample) and the AP-MAE checkpoint --------------------------------
    patterns, meta = [], []
    for m in read_range(bus, PATTERNS_MINE):
        if isinstance(m, Message):
            patterns.append(m.record)
        if len(patterns) >= 4000:
            break
    import redis

    entry = Registry(redis.Redis.from_url(demo.bus.redis_url), demo.bus.topic_prefix).get("apmae", "demo")
    model, meta = from_pretrained(demo.bus.artifacts_dir / entry["path"])
    rng = np.random.default_rng(0)
    pick = rng.choice(len(patterns), min(400, len(patterns)), replace=False)
    x = torch.from_numpy(np.stack([decode_pattern(patterns[i].payload, patterns[i].size, patterns[i].dtype)
                                   for i in pick]))
    half = len(x) // 2
    losses = E.reconstruction_losses(model, x[half:])
    base = E.mean_patch_losses(model, x[:half], x[half:])
    held_ids = [patterns[i].sample_id for i in pick[half:]]
    s_ap, s_base = E.summary(losses, held_ids), E.summary(base, held_ids)
    numbers["reconstruction"] = {"apmae": s_ap, "mean_patch_baseline": s_base,
                                 "ratio_apmae_to_baseline": float(losses.mean() / base.mean()),
                                 "checkpoint_step": meta.get("step")}
    E.figure1(model, x[half], out / "figure1.png")
    diff = (losses - base).numpy()  # paired: the same patterns and masks
    d_groups: dict[str, list[float]] = defaultdict(list)
    for sid, v in zip(held_ids, diff.tolist(), strict=True):
        d_groups[sid].append(v)
    d_means = np.array([np.mean(g) for g in d_groups.values()])
    boot = np.random.default_rng(0).integers(0, len(d_means), size=(1000, len(d_means)))
    d_ci = np.quantile(d_means[boot].mean(1), [0.025, 0.975])
    numbers["reconstruction"]["apmae_minus_baseline_ci95"] = [float(d_ci[0]), float(d_ci[1])]
    body = ("<img src='figure1.png' alt='Figure 1'>"
            f"<p>Masked-patch MSE on n = {s_ap['n_patterns']} held-out mining patterns from n = {s_ap['n']} samples: "
            f"AP-MAE {s_ap['mean']:.4f} (95% CI {_interval(s_ap.get('ci95'))}, bootstrap over samples); "
            f"predicting the mean patch {s_base['mean']:.4f} (95% CI {_interval(s_base.get('ci95'))}); "
            f"ratio {numbers['reconstruction']['ratio_apmae_to_baseline']:.2f}; paired difference AP-MAE minus "
            f"baseline 95% CI {_interval(d_ci)}. Checkpoint step {meta.get('step')}.</p>")
    if d_ci[0] >= 0 or losses.mean() >= base.mean():
        body += _warn("AP-MAE does <b>not</b> beat its baseline here: its masked-patch error is not below "
                      "predicting the mean patch (the paired 95% interval does not lie below 0). The "
                      "demo trains only a few steps; the clusters below are built on these embeddings.")
    # Table 2 (paper 4.1): rows the model AP-MAE was trained on, columns the model evaluated on,
    # with the baseline beside each cell; the demo trains one AP-MAE on one target model
    target = patterns[0].model if patterns else "?"
    numbers["table2"] = [{"trained_on": target, "evaluated_on": target, "apmae": s_ap["mean"],
                          "apmae_ci95": s_ap.get("ci95"), "baseline": s_base["mean"], "baseline_ci95": s_base.get("ci95"),
                          "ratio": numbers["reconstruction"]["ratio_apmae_to_baseline"], "n_samples": s_ap["n"]}]
    body += ("<h3>Table 2: reconstruction loss by target model</h3><table><tr><th>AP-MAE trained on</th>"
             "<th>evaluated on</th><th>AP-MAE loss [95% CI]</th><th>mean-patch baseline [95% CI]</th>"
             "<th>ratio</th><th>n samples</th></tr>"
             + "".join(f"<tr><td>{html.escape(r['trained_on'])}</td><td>{html.escape(r['evaluated_on'])}</td>"
                       f"<td>{r['apmae']:.4f} {_interval(r['apmae_ci95'])}</td>"
                       f"<td>{r['baseline']:.4f} {_interval(r['baseline_ci95'])}</td><td>{r['ratio']:.2f}</td>"
                       f"<td>{r['n_samples']}</td></tr>" for r in numbers["table2"])
             + "</table><p>One target model here; <code>apmae eval --checkpoint A --checkpoint B</code> fills the "
               "cross-model table (the study's <code>cross_eval</code>).</p>")
    history = meta.get("log_history") or []
    if history:
        loss_curve(history, out / "loss.png", f"AP-MAE training loss ({len(history)} points, in sample)")
        numbers["training_loss"] = {"first": history[0]["loss"], "last": history[-1]["loss"],
                                    "steps": history[-1]["step"], "points": len(history)}
        body += ("<h3>Training loss</h3><img src='loss.png' alt='training loss'><p>The per-batch loss on the "
                 "training patterns (in sample): it says the optimiser works, not that AP-MAE generalises; the "
                 "held-out comparison above does that.</p>")
    sections.append(body, "AP-MAE reconstruction (Figure 1, Table 2, training loss)", "reconstruction")

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
        layer_head_heatmap(per_head, n_layers, n_heads, "clusters per head (mined layers)",
                           out / "figure3.png", "clusters", counts=True, only_given_layers=True)
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
        counts_hist = np.bincount(list(per_head.values()))
        sections.append("<img src='figure3.png' alt='Figure 3'>"
                        f"<p>n = {len(per_head)} fitted heads; heads per cluster count: "
                        + ", ".join(f"{c} clusters: {k}" for c, k in enumerate(counts_hist) if k) + ".</p>",
                        "Clusters per head (Figure 3)", "clusters")
        sections.append(f"<img src='figure2.png' alt='Figure 2'><p>Head L{best[0]}H{best[1]} (most clusters), "
                        f"up to 5 example patterns per cluster from n = {sum(len(v) for v in examples.values())} "
                        "shown.</p>", f"Patterns per cluster, head L{best[0]}H{best[1]} (Figure 2)", "figure2")
        try:
            from apmae.cluster import HeadModel
            from services.registry import ArtifactStore

            entry, data = registry.verify("cluster", head_key(model_name, *best), ArtifactStore(demo.bus.artifacts_dir))
            hm = HeadModel.from_bytes(data, entry["sha256"])
            pts = _umap_2d(np.asarray(hm.embedding))
            cluster_scatter(pts, np.asarray(hm.labels), out / "umap.png",
                            f"{head_key(model_name, *best)}: n = {len(pts)} points, 2-D UMAP of the fitted "
                            f"{np.asarray(hm.embedding).shape[1]}-d embedding")
            sections.append("<img src='umap.png' alt='UMAP scatter'><p>The head's fitted points (AP-MAE "
                            "embeddings after PCA and UMAP) drawn in 2-D by a second UMAP, coloured by their "
                            f"HDBSCAN cluster; n = {len(pts)}, noise ratio {_fmt(hm.noise_rate)}.</p>",
                            f"UMAP scatter, head L{best[0]}H{best[1]}", "umap")
        except Exception as e:  # noqa: BLE001 - a figure must not sink the report
            sections.append(f"<p>UMAP scatter not drawn: {html.escape(str(e))}</p>",
                            f"UMAP scatter, head L{best[0]}H{best[1]}", "umap")

    # --- classifier (Figures 4-6) --------------------------------------------------------------
    rows = []
    for model_name, m in done.get("classify", {}).get("models", {}).items():
        for t in m["tasks"]:
            rows.append({"model": model_name, "task": t["task"], "n": t.get("n"), "LLM correct": t.get("llm_correct_rate"),
                         "CV accuracy": t.get("mean"), "95% CI": _interval(t.get("ci95")),
                         "chance level": t.get("chance_level"),
                         "top head": next(iter(t.get("top_heads", {})), None), "skipped": t.get("skipped")})
        sections.append(f"<img src='accuracy-{safe_name(model_name)}.png' alt='Figure 4'>",
                        f"Correctness classifier, {model_name} (Figure 4)", f"classifier-{safe_name(model_name)}")
    if rows:
        sections.append(_table(rows, ["model", "task", "n", "LLM correct", "CV accuracy", "95% CI", "chance level",
                                      "top head", "skipped"]))
        losing = []
        for model_name, m in done.get("classify", {}).get("models", {}).items():
            for t in m["tasks"]:
                ci, ref = t.get("ci95"), t.get("baseline", t.get("chance_level"))
                if t.get("mean") is not None and ci is not None and ref is not None and ci[0] <= ref:
                    losing.append(f"{html.escape(model_name)} {html.escape(str(t['task']))} "
                                  f"({_fmt(t['mean'])}, 95% CI {_interval(ci)}, n = {t.get('n')}, baseline {_fmt(ref)})")
        if losing:
            sections.append(_warn("The classifier does <b>not</b> beat its baseline (95% interval not above it) "
                                  f"for {len(losing)} of {len(rows)} tasks: " + "; ".join(losing) + "."))
    for png in sorted(out.glob("shap-*.png")):
        sections.append(f"<img src='{png.name}' alt='{html.escape(png.stem)}'>", f"{png.stem} (Figures 5-6)")
    cal_html, cal, n_labelled = _calibration(bus, out)
    numbers["calibration"] = cal
    sections.append(cal_html, "Scorer calibration (live scores)", "calibration")

    # --- head intervention ---------------------------------------------------------------------
    iv = done.get("intervene", {})
    if iv.get("summary"):
        numbers["intervene"] = iv
        sections.append("<img src='intervene.png' alt='intervention'>"
                        "<p>Change in the target model's correctness rate on n held-out inputs per task when the "
                        "task's top-SHAP heads, random heads (mean of draws) or the most neutral heads are zeroed.</p>"
                        + _table(iv["summary"], ["task", "n", "correct_rate", "top", "random_mean", "random_std",
                                                 "neutral"]), f"Head intervention: {iv['k']} heads zeroed per task",
                        "intervene")

    # --- pipeline numbers ------------------------------------------------------------------------
    pred_rows = [{"task": t, **c} for t, c in sorted(prod.get("predictions", {}).items())]
    timing_rows = [{"stage": s, "seconds": v} for s, v in done.get("_timings", {}).items()]
    live = done.get("live", {})
    numbers.update({"timings": done.get("_timings"), "predictions": prod.get("predictions"), "live": live,
                    "train": done.get("train"), "cluster": done.get("cluster")})
    numbers.update({"smoke": True, "study": "docs/study/numbers.json"})  # demo scale: not results
    (out / "numbers.json").write_text(json.dumps(numbers, indent=2, default=str))
    n_pred = {t: sum(v for v in c.values() if isinstance(v, int)) for t, c in prod.get("predictions", {}).items()}
    head = [("stages", "Stages", _table(timing_rows, ["stage", "seconds"])),
            ("predictions", "Target model predictions per task",
             _table([{**r, "n": n_pred.get(r["task"])} for r in pred_rows],
                    ["task", "n", "correct", "incorrect", "unlabelled"]))]
    sections.items[:0] = head
    sections.append(f"<p>n = {live.get('ingested')} new files: n = {live.get('embedded')} patterns embedded, "
                    f"n = {live.get('scores')} samples scored in all, {_live_accuracy(live, n_labelled)}.</p><p>All numbers: <a href='numbers.json'>numbers.json</a></p>",
                    "Live stream", "live")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>apmae demo report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}img{{max-width:100%}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}
th{{background:#f3f3f3}}.warn{{background:#fff4e5;border-left:4px solid #e67e22;padding:6px 10px}}
.smoke{{color:#8a5a00;font-size:13px;font-style:italic}}
nav ol{{columns:2;font-size:14px}}</style></head><body>
<h1>apmae demo report (smoke run)</h1>{SMOKE_TAG}
<p>Target model <b>{html.escape(str(prod.get('model')))}</b> ({html.escape(str(prod.get('mode')))} mode,
{prod.get('heads_per_sample')} heads per sample, {prod.get('mined_heads')} mined) on
{done.get('ingest', {}).get('published')} files of {html.escape(str(demo.cfg.corpus or 'the JDK src.zip'))}.
The JDK sources are likely in the model's training data: correctness rates are inflated.
Every number states its n; intervals are 95%: Wilson for rates, bootstrap over samples for mean losses.</p>
{sections.toc()}
{sections.html()}
</body></html>"""
    path = out / "index.html"
    path.write_text(page)
    return path
