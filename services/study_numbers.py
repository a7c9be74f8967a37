"""The study's results: ``numbers.json``, the five-minute ``README.md`` and the PNG figures.

Read from the stages :class:`services.study.Study` recorded: every number with its n and a
95% CI, each verdict said in words (an honest negative included), smoke runs labelled.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from apmae.config import BusConfig

log = logging.getLogger("apmae.study")


class StudySettings(Protocol):
    """The :class:`services.study.StudyConfig` settings the numbers read (all of it goes into
    ``numbers.json``'s ``config``)."""

    out_dir: Path
    corpus: str
    target_balanced: int
    min_tasks: int
    intervene_draws: int
    umap_heads: int


class RecordedStudy(Protocol):
    """What the numbers are read from: a :class:`services.study.Study` whose stages ran (or
    were resumed). A protocol, not that class, so the report does not import the study it
    reports on (``services.study`` imports this file to write its last stage)."""

    cfg: StudySettings
    bus: BusConfig
    done: dict  # each stage's recorded result, as in <state>/study/stages.json
    plan: dict  # the sizes the stages were planned with

    @property
    def smoke(self) -> bool: ...


def fmt_ci(ci) -> str:
    return "" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# -- numbers.json, README.md and figures ---------------------------------------------------------
PAPER_LOG_SCALING = ("section 4.2 finds log scaling necessary (without it the masked patches are not "
                     "reconstructed)")


def _num(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-2 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def reconstruction_numbers(ev: dict, train: dict) -> dict:
    main = ev.get("runs", {}).get("main", {})
    if "ratio" not in main:
        return {"skipped": main.get("skipped") or ev.get("skipped", "no evaluation"), "split": "by_sample"}
    ratio, ci = main["ratio"], main["ratio_ci95"]
    beats = ci[1] < 1.0
    verdict = ("AP-MAE's masked-patch error is below the mean-patch baseline's (ratio CI below 1)" if beats else
               "AP-MAE does NOT beat the mean-patch baseline (the ratio's 95% CI reaches 1 or above): no evidence "
               "that it learned more than the average pattern")
    return {"apmae": main["apmae"], "mean_patch_baseline": main["mean_patch_baseline"], "ratio": ratio,
            "ratio_ci95": ci, "apmae_minus_baseline_ci95": main["apmae_minus_baseline_ci95"],
            "n_samples": main["n_samples"], "n_patterns": main["n_patterns"], "split": "by_sample",
            "heads_per_sample": ev.get("heads_per_sample"), "ci_method": main["ci_method"],
            "checkpoint_step": main.get("checkpoint_step"), "train_steps_limited_by": train.get("limited_by"),
            "target_ratio": 0.5, "target_reached": bool(ci[1] <= 0.5), "beats_baseline": beats, "verdict": verdict,
            "held_out_files": ev.get("held_out_files")}


def diagnosis_numbers(dg: dict, main: dict) -> dict:
    """Each diagnostic run's ratio beside the reference (the main recipe at the same steps):
    a change helps only where its ratio's CI lies below the reference's."""
    runs = dg.get("runs") or {}
    ref = runs.get("reference", {})
    if "ratio" not in ref:
        return {"skipped": dg.get("skipped", "not run")}
    rows = {}
    for label, r in runs.items():
        if "ratio" not in r:
            rows[label] = {"skipped": r.get("skipped")}
            continue
        if label == "reference":
            effect = "the main recipe at these steps"
        elif r["ratio_ci95"][1] < ref["ratio_ci95"][0]:
            effect = "better than the reference (CIs apart)"
        elif r["ratio_ci95"][0] > ref["ratio_ci95"][1]:
            effect = "worse than the reference (CIs apart)"
        else:
            effect = "no difference from the reference (CIs overlap)"
        rows[label] = {"ratio": r["ratio"], "ratio_ci95": r["ratio_ci95"], "n_samples": r["n_samples"],
                       "change": r.get("change"), "effect": effect}
    steps_trend = None
    if "ratio" in main:
        steps_trend = (f"main recipe: ratio {_num(ref['ratio'])} {fmt_ci(ref['ratio_ci95'])} at {dg['steps']} steps, "
                       f"{_num(main['ratio'])} {fmt_ci(main['ratio_ci95'])} at {dg['main_steps']} steps")
    return {"steps": dg.get("steps"), "main_steps": dg.get("main_steps"), "runs": rows, "steps_trend": steps_trend,
            "helps": [k for k, v in rows.items() if v.get("effect", "").startswith("better")]}


def log_scaling_numbers(ev: dict, steps) -> dict:
    runs = ev.get("runs", {})
    lg, raw = runs.get("ablation-log", {}), runs.get("ablation-raw", {})
    if "ratio" not in lg or "ratio" not in raw:
        return {"skipped": "ablation runs missing", "paper": PAPER_LOG_SCALING}
    a, b = lg["ratio_ci95"], raw["ratio_ci95"]
    if a[1] < b[0]:
        agrees, how = True, "agrees with"
    elif b[1] < a[0]:
        agrees, how = False, "contradicts"
    else:
        agrees, how = None, "neither confirms nor contradicts (the two ratios' 95% CIs overlap)"
    neither = a[0] >= 1 and b[0] >= 1
    sentence = (f"At {steps} steps each, log-scaled AP-MAE's loss is {_num(lg['ratio'])} {fmt_ci(a)} times its own "
                f"mean-patch baseline's and raw AP-MAE's {_num(raw['ratio'])} {fmt_ci(b)} times its own (n = "
                f"{lg['n_samples']} held-out samples). This {how} the paper, whose {PAPER_LOG_SCALING}"
                + (". But neither run beats its own baseline here, so this is a comparison of two failures, "
                   "not evidence that log scaling makes AP-MAE work" if neither else "")
                + ". Absolute losses are not comparable across the two (different target spaces), hence each "
                  "against its own baseline.")
    return {"steps": steps, "log": lg, "raw": raw, "agrees_with_paper": agrees, "neither_beats_baseline": neither,
            "sentence": sentence, "paper": PAPER_LOG_SCALING}


def cluster_numbers(study: RecordedStudy) -> dict:
    import redis

    from services.registry import Registry

    registry = Registry(redis.Redis.from_url(study.bus.redis_url), study.bus.topic_prefix)
    heads = {}
    for key in registry.names("cluster"):
        e = registry.get("cluster", key) or {}
        _, layer, head = key.rsplit("/", 2)
        cos = float(e.get("mean_cosine", "nan"))
        heads[f"L{layer}H{head}"] = {"layer": int(layer), "head": int(head), "n_clusters": int(e.get("n_clusters", 0)),
                                     "n_points": int(e.get("n", 0)), "noise_ratio": float(e.get("noise_rate", "nan")),
                                     "mean_pairwise_cosine": cos if math.isfinite(cos) else None, "key": key}
    if not heads:
        return {"skipped": "no head was fitted", "heads": {}}
    counts = [h["n_clusters"] for h in heads.values()]
    dist = {str(c): counts.count(c) for c in sorted(set(counts))}
    cos = [h["mean_pairwise_cosine"] for h in heads.values() if h["mean_pairwise_cosine"] is not None]
    one = counts.count(1) + counts.count(0)
    note = (f"{one} of {len(heads)} heads have at most one cluster" +
            (f"; the median head's embeddings have a mean pairwise cosine of {np.median(cos):.3f} (near 1 = nearly "
             "one vector: nothing to cluster)" if cos else ""))
    return {"heads": dict(sorted(heads.items(), key=lambda kv: (kv[1]["layer"], kv[1]["head"]))),
            "distribution": dist, "n_heads": len(heads), "heads_with_at_most_one_cluster": one,
            "mean_pairwise_cosine": ({"median": float(np.median(cos)), "min": float(min(cos)), "max": float(max(cos)),
                                      "n_heads": len(cos)} if cos else None),
            "points_per_head": {"min": min(h["n_points"] for h in heads.values()),
                                "max": max(h["n_points"] for h in heads.values())},
            "note": note}


def task_numbers(study: RecordedStudy) -> dict:
    from apmae.tasks import LABELLED_TASKS

    out = {}
    for model_name, m in study.done.get("classify", {}).get("models", {}).items():
        for t in m["tasks"]:
            llm = t.get("llm_correct") or {}
            row = {"model": model_name, "llm_correct_rate": llm.get("rate"), "llm_correct_ci95": llm.get("ci95"),
                   "llm_candidates_n": llm.get("n"), "chance_level": 0.5}
            if "mean" not in t:
                row.update({"n_balanced": 0, "skipped": t.get("skipped"), "n_labelled_rows": t.get("n_labelled_rows")})
            else:
                lo, hi = t["ci95"]
                row.update({"n_balanced": t["n_balanced"], "cv_accuracy": t["mean"], "ci95": t["ci95"],
                            "ci_method": t.get("ci_method"), "cv_split": t.get("cv_split"), "folds": t.get("folds"),
                            "p_value_vs_chance": t.get("p_value"),
                            "signal": bool(lo > 0.5),
                            "verdict": ("above chance (Wilson 95% CI above 0.5)" if lo > 0.5 else
                                        "no signal: the 95% CI includes chance (0.5)" if hi >= 0.5 else
                                        "below chance (CI below 0.5)"),
                            "top_heads": dict(list(t.get("top_heads", {}).items())[:5])})
            out[t["task"]] = row
    mined = study.done.get("produce", {}).get("mined", {})
    for task in LABELLED_TASKS:  # a task with no complete mined row is still reported, with its zero
        if task not in out:
            out[task] = {"n_balanced": 0, "skipped": "no complete mined row", "chance_level": 0.5,
                         "mined": mined.get(task), "llm_correct_rate": None, "llm_correct_ci95": None,
                         "llm_candidates_n": 0}
    from apmae.stats import holm

    # ten tasks are ten tests against chance: the family-wise correction decides "signal"
    adjusted = holm({t: r["p_value_vs_chance"] for t, r in out.items() if r.get("p_value_vs_chance") is not None})
    for task, p in adjusted.items():
        out[task]["p_value_holm"] = p
        out[task]["signal_after_holm"] = bool(out[task]["signal"] and p < 0.05)
    return dict(sorted(out.items()))


def intervention_numbers(study: RecordedStudy) -> dict:
    from apmae.stats import wilson_interval

    iv = study.done.get("intervene", {})
    if not iv.get("summary"):
        return {"skipped": iv.get("skipped", "no fitted task"), "held_out": "files never mined"}
    rows = []
    for r in iv["summary"]:
        k = round(r["correct_rate"] * r["n"])
        rows.append({**r, "correct_rate_ci95": list(wilson_interval(k, r["n"])),
                     "top_significant": bool(r.get("top_p_value") is not None and r["top_p_value"] < 0.05),
                     "top_rank_among_random": r.get("top_rank")})
    sig = [r["task"] for r in rows if r["top_significant"]]
    return {"k": iv.get("k"), "random_draws": study.cfg.intervene_draws,
            "per_task": study.plan.get("intervene_per_task"), "held_out": "files never mined (by file id)",
            "test": "McNemar exact, each condition vs the unchanged model on the same inputs",
            "tasks": rows, "tasks_where_top_heads_change_correctness_p_lt_0.05": sig}


def live_numbers(study: RecordedStudy) -> dict:
    lv = study.done.get("live", {})
    live = dict(lv.get("live", {}))
    live.update({"in_sample": False, "files_streamed": lv.get("ingested"), "scores": lv.get("scores"),
                 "in_sample_scores_left_out": lv.get("in_sample_scores")})
    if not live.get("n"):
        live["verdict"] = "no out-of-sample live score with a known truth: no live accuracy"
    return live


def write_numbers(study: RecordedStudy) -> Path:
    import datetime

    from apmae.config import to_dict

    cfg, done = study.cfg, study.done
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    ev = done.get("evaluate", {})
    tasks = task_numbers(study)
    reaching = sorted(t for t, r in tasks.items() if r.get("n_balanced", 0) >= cfg.target_balanced)
    numbers = {
        "smoke": study.smoke,
        "note": ("SMOKE RUN: sizes far below the study's; these numbers test the machinery and are not results"
                 if study.smoke else "apmae study: every number with its n and a 95% CI"),
        "generated_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "target_model": done.get("produce", {}).get("model"),
        "corpus": cfg.corpus or "the JDK src.zip",
        "targets": {"balanced_per_task": cfg.target_balanced, "tasks_required": cfg.min_tasks,
                    "labelled_tasks": len(tasks), "tasks_reaching": reaching,
                    "met": len(reaching) >= cfg.min_tasks},
        "reconstruction": reconstruction_numbers(ev, done.get("train", {})),
        "log_scaling": log_scaling_numbers(ev, study.plan.get("ablation_steps")),
        "diagnosis": diagnosis_numbers(done.get("diagnose", {}), ev.get("runs", {}).get("main", {})),
        "clusters_per_head": cluster_numbers(study),
        "tasks": tasks,
        "intervention": intervention_numbers(study),
        "live": live_numbers(study),
        "cross_eval": {"table": ev.get("cross_eval"), "n_unit": "samples",
                       "rows": "AP-MAE runs (trained on)", "columns": "target model whose mined patterns are scored",
                       "baseline": "each cell's 'baseline': the mean patch of half the samples, scored on the other "
                                   "half with the cell's own preprocessing and masks; 'ratio' = AP-MAE / baseline"},
        "produce": {k: done.get("produce", {}).get(k) for k in ("files", "stopped", "predictions", "mined",
                                                                 "predictions_per_s", "train_patterns", "rounds")},
        "train": done.get("train"), "ablate": done.get("ablate"),
        "rates": done.get("calibrate"), "plan": study.plan,
        "timings_s": {k: round(v, 1) for k, v in done.get("_timings", {}).items()},
        "config": to_dict(cfg),
    }
    figures = draw_figures(study, numbers, out)
    numbers["figures"] = figures
    (out / "numbers.json").write_text(json.dumps(numbers, indent=2, default=str))
    (out / "README.md").write_text(readme(numbers, figures))
    return out / "numbers.json"


def draw_figures(study: RecordedStudy, numbers: dict, out: Path) -> list[str]:
    """PNGs beside the README; a figure that cannot be drawn is left out, never fatal."""
    from apmae.figures import (
        _plt,
        accuracy_bars,
        intervention_bars,
        layer_head_heatmap,
        save_figure,
    )

    drawn = []

    def attempt(name: str, fn) -> None:
        try:
            fn(out / name)
            drawn.append(name)
        except Exception as e:  # noqa: BLE001 - a figure must not sink the numbers
            log.warning("figure %s not drawn: %s", name, e)

    if (out / "figure1.png").exists():
        drawn.append("figure1.png")
    runs = study.done.get("evaluate", {}).get("runs", {})

    def ratio_bars(rows: dict, colors: list[str], title: str, path: Path) -> None:
        """Each run's loss over its own baseline with its 95% CI, against 1 and the 0.5 target."""
        plt = _plt()
        labels = list(rows)
        vals = [rows[k]["ratio"] for k in labels]
        err = [[v - rows[k]["ratio_ci95"][0] for k, v in zip(labels, vals, strict=True)],
               [rows[k]["ratio_ci95"][1] - v for k, v in zip(labels, vals, strict=True)]]
        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        ax.bar(labels, vals, yerr=err, capsize=4, color=colors[:len(labels)])
        ax.axhline(1, color="black", lw=1, label="own mean-patch baseline (1.0)")
        ax.axhline(0.5, color="gray", ls="--", lw=1, label="target 0.5")
        ax.set_ylabel("AP-MAE loss / own baseline")
        ax.set_title(title)
        ax.legend(fontsize=8)
        save_figure(fig, path)

    recon = {k: runs[k] for k in ("main", "ablation-log", "ablation-raw") if "ratio" in runs.get(k, {})}
    if recon:
        attempt("reconstruction.png", lambda p: ratio_bars(
            recon, ["#2b6cb0", "#48bb78", "#ed8936"],
            f"reconstruction on held-out samples, n = {next(iter(recon.values()))['n_samples']} (95% CI)", p))
    diag = {k: v for k, v in (numbers["diagnosis"].get("runs") or {}).items() if "ratio" in v}
    if diag:
        attempt("diagnosis.png", lambda p: ratio_bars(
            diag, ["#2b6cb0"] + ["#a0aec0"] * len(diag),
            f"one change at a time, {numbers['diagnosis']['steps']} steps each (95% CI)", p))
    heads = numbers["clusters_per_head"].get("heads", {})
    if heads:
        per = {(h["layer"], h["head"]): h["n_clusters"] for h in heads.values()}
        n_layers = 1 + max(k[0] for k in per)
        n_heads = 1 + max(k[1] for k in per)
        attempt("clusters.png", lambda p: layer_head_heatmap(per, n_layers, n_heads, "clusters per head (mined layers)",
                                                              p, "clusters", counts=True, only_given_layers=True))

        def spread(path: Path) -> None:
            plt = _plt()
            hs = [h for h in heads.values() if h["mean_pairwise_cosine"] is not None]
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.scatter([h["mean_pairwise_cosine"] for h in hs], [h["n_clusters"] for h in hs], alpha=0.7)
            ax.set_xlabel("mean pairwise cosine of the head's AP-MAE embeddings")
            ax.set_ylabel("HDBSCAN clusters")
            ax.set_title(f"clusters vs embedding spread, n = {len(hs)} heads")
            save_figure(fig, path)

        attempt("clusters_vs_cosine.png", spread)
        attempt("umap.png", lambda p: umap_panel(study, heads, p))
    fitted = [dict(r, task=t, mean=r["cv_accuracy"], llm_correct={"rate": r["llm_correct_rate"],
                                                                    "ci95": r["llm_correct_ci95"]})
              for t, r in numbers["tasks"].items() if "cv_accuracy" in r]
    if fitted:
        attempt("tasks.png", lambda p: accuracy_bars(fitted, p, "classifier CV accuracy (by file) vs chance, "
                                                                "LLM correct rate over all candidates"))
    iv = numbers["intervention"].get("tasks")
    if iv:
        attempt("intervention.png", lambda p: intervention_bars(iv, p, f"correctness change, "
                                                                       f"{numbers['intervention']['k']} heads zeroed"))
    return drawn


def umap_panel(study: RecordedStudy, heads: dict, path: Path) -> None:
    """2-D UMAP of the fitted points of the heads with the most clusters."""
    import redis

    from apmae.cluster import HeadModel
    from apmae.figures import _plt, save_figure
    from services.registry import ArtifactStore, Registry
    from services.report import _umap_2d

    registry = Registry(redis.Redis.from_url(study.bus.redis_url), study.bus.topic_prefix)
    store = ArtifactStore(study.bus.artifacts_dir)
    pick = sorted(heads.values(), key=lambda h: (-h["n_clusters"], h["layer"], h["head"]))[:study.cfg.umap_heads]
    plt = _plt()
    fig, axes = plt.subplots(1, len(pick), figsize=(3.2 * len(pick), 3.2), squeeze=False)
    for ax, h in zip(axes[0], pick, strict=False):
        e, data = registry.verify("cluster", h["key"], store)
        hm = HeadModel.from_bytes(data, e["sha256"])
        pts = _umap_2d(np.asarray(hm.embedding))
        labels = np.asarray(hm.labels)
        ax.scatter(pts[:, 0], pts[:, 1], c=labels, s=5, cmap="tab10")
        ax.set_title(f"L{h['layer']}H{h['head']}: {h['n_clusters']} clusters, n = {len(pts)}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    save_figure(fig, path)


def readme(n: dict, figures: list[str]) -> str:
    """The five-minute read: what was measured, on what n, and whether there is signal."""
    L = []
    smoke = n["smoke"]
    L.append("# apmae study" + (" — SMOKE RUN (not results)" if smoke else ""))
    L.append("")
    if smoke:
        L.append("> **Smoke run.** Tiny sizes that test the machinery end to end; none of the numbers below is a "
                 "result. Run `apmae study` with its defaults for the real numbers.")
        L.append("")
    t = n["targets"]
    L.append(f"Target model **{n['target_model']}** on {n['corpus']}, generated {n['generated_utc']}. "
             f"Every number carries its n and a 95% CI (Wilson for proportions, bootstrap over samples for losses). "
             f"Splits are by sample (AP-MAE's training samples are never mined or evaluated) and by file for held-out "
             f"sets. Scale target: >= {t['balanced_per_task']} balanced samples for >= {t['tasks_required']} of the "
             f"{t['labelled_tasks']} labelled tasks: **{'met' if t['met'] else 'NOT met'}** "
             f"({len(t['tasks_reaching'])} tasks: {', '.join(t['tasks_reaching']) or 'none'}).")
    L.append("")
    r = n["reconstruction"]
    L.append("## 1. Does AP-MAE reconstruct attention better than the mean patch?")
    if "ratio" in r:
        L.append(f"Masked-patch MSE on n = {r['n_samples']} held-out samples ({r['n_patterns']} patterns, split "
                 f"{r['split']}): AP-MAE {_num(r['apmae']['mean'])} {fmt_ci(r['apmae'].get('ci95'))} vs mean-patch "
                 f"baseline {_num(r['mean_patch_baseline']['mean'])} {fmt_ci(r['mean_patch_baseline'].get('ci95'))}; "
                 f"**ratio {r['ratio']:.3f} {fmt_ci(r['ratio_ci95'])}** (target <= 0.5: "
                 f"{'reached' if r['target_reached'] else 'not reached'}). {r['verdict']}. Checkpoint step "
                 f"{r['checkpoint_step']}, steps limited by {r['train_steps_limited_by']}.")
        hf = r.get("held_out_files") or {}
        if "ratio" in hf:
            L.append(f"On samples of held-out files only (no sample of the file trained AP-MAE): ratio "
                     f"{hf['ratio']:.3f} {fmt_ci(hf['ratio_ci95'])}, n = {hf['n_samples']} samples.")
    else:
        L.append(f"Not measured: {r.get('skipped')}.")
    L.append("")
    dg = n["diagnosis"]
    if dg.get("runs"):
        L.append(f"**Why the target is missed** (each run {dg['steps']} steps, one change from the main recipe, "
                 f"each against its own baseline on the same held-out samples): {dg['steps_trend']}.")
        L.append("")
        L.append("| run | change | ratio [95% CI] | n samples | effect |")
        L.append("|---|---|---|---|---|")
        for label, row in dg["runs"].items():
            if "ratio" in row:
                L.append(f"| {label} | {row['change'] or '-'} | {row['ratio']:.3f} {fmt_ci(row['ratio_ci95'])} | "
                         f"{row['n_samples']} | {row['effect']} |")
        L.append("")
        L.append(f"Changes that help: {', '.join(dg['helps']) if dg['helps'] else 'none at these steps'}.")
        if dg["steps"] and dg["main_steps"] and dg["steps"] * 5 <= dg["main_steps"]:
            L.append(f"These runs are short ({dg['steps']} of the main run's {dg['main_steps']} steps, what the "
                     "budget left): they say which changes speed up early training, not which would reach the "
                     "target; the steps trend above is the strongest lead.")
    elif r.get("target_reached") is False:
        L.append(f"Why the target is missed: not diagnosed ({dg.get('skipped')}).")
    L.append("")
    ls = n["log_scaling"]
    L.append("## 2. Log-scaling ablation (paper 4.2)")
    L.append(ls.get("sentence") or f"Not measured: {ls.get('skipped')}.")
    L.append("")
    c = n["clusters_per_head"]
    L.append("## 3. Clusters per head")
    if c.get("heads"):
        L.append(f"n = {c['n_heads']} heads (every head of the mined layers), {c['points_per_head']['min']}-"
                 f"{c['points_per_head']['max']} points each. Heads per cluster count: "
                 + ", ".join(f"{k} clusters: {v}" for k, v in c["distribution"].items()) + f". {c['note']}.")
    else:
        L.append(f"Not measured: {c.get('skipped')}.")
    L.append("")
    L.append("## 4. Can the heads' clusters predict whether the model is right? (classifier, CV by file)")
    L.append("")
    L.append("| task | n balanced | CV accuracy [95% CI] | chance | p vs chance (Holm) | verdict | "
             "LLM correct rate, all candidates [95% CI] (n) |")
    L.append("|---|---|---|---|---|---|---|")
    for task, row in n["tasks"].items():
        llm = f"{_num(row['llm_correct_rate'])} {fmt_ci(row['llm_correct_ci95'])} ({row['llm_candidates_n']})"
        if "cv_accuracy" in row:
            L.append(f"| {task} | {row['n_balanced']} | {row['cv_accuracy']:.3f} {fmt_ci(row['ci95'])} | 0.5 | "
                     f"{_num(row.get('p_value_vs_chance'))} ({_num(row.get('p_value_holm'))}) | {row['verdict']} | "
                     f"{llm} |")
        else:
            L.append(f"| {task} | {row['n_balanced']} | skipped: {row['skipped']} | 0.5 | | | {llm} |")
    sig = [t for t, row in n["tasks"].items() if row.get("signal")]
    L.append("")
    L.append(f"Tasks with a CI above chance: {', '.join(sig) if sig else '**none: no signal**'}.")
    holm_sig = [t for t, row in n["tasks"].items() if row.get("signal_after_holm")]
    L.append(f"Of these, with the Holm correction over the {sum('p_value_holm' in r for r in n['tasks'].values())} "
             f"tasks tested (family-wise p < 0.05): {', '.join(holm_sig) if holm_sig else 'none'}.")
    L.append("")
    iv = n["intervention"]
    L.append("## 5. Do the top-SHAP heads matter to the model? (intervention on held-out files)")
    if iv.get("tasks"):
        L.append(f"{iv['k']} heads zeroed per condition; {iv['random_draws']} random head sets; {iv['per_task']} "
                 f"inputs per task at most, from {iv['held_out']}. {iv['test']}.")
        L.append("")
        L.append("| task | n | correct rate [95% CI] | top-SHAP Δ (McNemar p) | random Δ mean ± sd | share of random "
                 "draws hurting as much | neutral Δ (p) |")
        L.append("|---|---|---|---|---|---|---|")
        for row in iv["tasks"]:
            L.append(f"| {row['task']} | {row['n']} | {row['correct_rate']:.3f} {fmt_ci(row['correct_rate_ci95'])} | "
                     f"{row['top']:+.3f} ({_num(row['top_p_value'])}) | {_num(row['random_mean'])} ± "
                     f"{_num(row['random_std'])} | {_num(row['top_rank_among_random'])} | {row['neutral']:+.3f} "
                     f"({_num(row['neutral_p_value'])}) |")
        sig = iv["tasks_where_top_heads_change_correctness_p_lt_0.05"]
        L.append("")
        L.append(f"Top-SHAP heads change correctness at p < 0.05 for: {', '.join(sig) if sig else 'no task'}.")
    else:
        L.append(f"Not measured: {iv.get('skipped')}.")
    L.append("")
    lv = n["live"]
    L.append("## 6. Live scoring, out of sample")
    if lv.get("n"):
        L.append(f"Accuracy {lv['accuracy']:.3f} {fmt_ci(lv['ci95'])} on n = {lv['n']} scores of {lv.get('files')} "
                 f"files no classifier was fit on (in_sample: false; {lv.get('left_out_seen_files')} scores of seen "
                 "files left out).")
    else:
        L.append(lv.get("verdict", "Not measured."))
    L.append("")
    L.append("## 7. Table 2 (cross-evaluation, n in samples, with the mean-patch baseline)")
    table = n["cross_eval"].get("table") or {}
    if table:
        cols = sorted({c for row in table.values() for c in row})
        L.append("")
        L.append("| trained \\ evaluated | " + " | ".join(cols) + " |")
        L.append("|---|" + "---|" * len(cols))
        for name, row in table.items():
            cells = []
            for col in cols:
                cell = row.get(col, {})
                if "ratio" in cell:
                    cells.append(f"{cell['mean'] * 1e3:.2f}e-3 {fmt_ci([v * 1e3 for v in cell['ci95']])}e-3; baseline "
                                 f"{cell['baseline']['mean'] * 1e3:.2f}e-3; ratio {cell['ratio']:.2f}; n = {cell['n']} samples")
                else:
                    cells.append(f"{_num(cell.get('mean'))} (n = {cell.get('n')})")
            L.append(f"| {name} | " + " | ".join(cells) + " |")
    else:
        L.append("Not measured.")
    L.append("")
    L.append("## Stages")
    L.append("")
    L.append("| stage | seconds |")
    L.append("|---|---|")
    for k, v in n["timings_s"].items():
        L.append(f"| {k} | {v} |")
    L.append("")
    if figures:
        L.append("## Figures")
        L.append("")
        for f in figures:
            L.append(f"![{f}]({f})")
        L.append("")
    L.append("All numbers: [numbers.json](numbers.json).")
    return "\n".join(L) + "\n"
