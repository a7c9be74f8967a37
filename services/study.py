"""``apmae study``: the whole pipeline at a scale where the statistics mean something (#15).

The study is the demo's pipeline (:class:`services.demo.Demo`: the same services, the same
stages) sized by a time budget instead of by hand, plus the measurements the demo is too
small for. Each stage records its result in ``<state>/study/stages.json``; a rerun skips the
finished stages and a half-finished training run resumes from its last checkpoint.

Stages (budget shares in :data:`SHARES`; each stage gets its share of what is left, so time
an early stage does not use goes to the later ones):

 1. infra       the embedded broker, Redis and Prometheus (the demo's stage)
 2. calibrate   time an AP-MAE training step and embedding on synthetic patterns of the
                study's size: the training stages are sized from these rates
 3. produce     ingest and mine files in chunks until the tasks are full (``mine_per_task``
                balanced samples each), the budget share is spent or the corpus ends; the
                forward rate is measured on the way (it sizes the intervention)
 4. train       AP-MAE on ``patterns.train`` (shuffle window), steps = min(time share x
                step rate, ``--train-epochs`` passes over the training patterns); the rate is
                measured by a 40-step probe on the real topic (the synthetic calibration ran
                ~4x faster than the first study's training actually did)
 5. encode      CLS embeddings of every mined pattern (the demo's stage)
 6. cluster     per-head PCA/UMAP/HDBSCAN, every head of the mined layers (the demo's stage)
 7. classify    per task CatBoost, CV by file, Wilson CIs over pooled fold predictions
 8. ablate      log scaling off (paper 4.2) at the main run's steps, the main run being the
                log arm; where the budget cannot afford that many, both arms anew at fewer
 9. evaluate    reconstruction vs the mean-patch baseline on mined (never trained) samples,
                by sample; the log-scaling ablation each against its own baseline; Table 2
10. intervene   top-SHAP vs >= 20 random head sets vs neutral heads on held-out files, McNemar
11. live        new files through produce -> encode -> assign -> score; accuracy only on
                files no classifier saw
12. numbers     ``<out>/numbers.json``, ``<out>/README.md`` and the PNG figures beside them

Splits (:mod:`apmae.split`): a random-task sample either trains AP-MAE or is mined, never
both; a ``held_out_files`` share of files trains nothing, so their mined samples give a
reconstruction number held out by file as well. Every number carries its n and a 95% CI.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from apmae.cluster import ClusterConfig
from apmae.config import nested, setting
from apmae.mining import MiningConfig
from apmae.recipe import TrainingConfig
from apmae.split import Split
from services.demo import Demo, DemoConfig, _bar

log = logging.getLogger("apmae.study")

STAGES = ("infra", "calibrate", "produce", "train", "encode", "cluster", "classify", "ablate", "evaluate",
          "intervene", "live", "numbers")
# share of the budget per stage (infra, calibrate and numbers take seconds and are not budgeted)
# Produce gets the most: measured on this 2-core machine (SmolLM2 ~2 samples/s, AP-MAE small 0.15 s/step),
# training is limited by its data (one pass over patterns.train, ~a few hundred steps), not by time.
# The raw ablation arm repeats the main run's steps, so ablate's share is about train's.
SHARES = {"produce": 0.55, "train": 0.11, "encode": 0.06, "cluster": 0.06, "classify": 0.05, "ablate": 0.09,
          "evaluate": 0.02, "intervene": 0.07, "live": 0.02}


@dataclass(frozen=True)
class StudyConfig(DemoConfig):
    # the demo's settings, at study scale
    files: int = setting(4000, "Most corpus files to mine (produce stops earlier when the tasks are full or its "
                               "budget share is spent)")
    live_files: int = setting(10, "Files streamed through the live path at the end (held out from the classifier; "
                                  "~20 s each on 2 cores)")
    # every head of four layers, 240 balanced samples per task; 20% of files held out by file; no
    # forward for a candidate of a full task (it would only add to the correct rate, which the
    # earlier files estimate without bias)
    mining: MiningConfig = nested(MiningConfig(mine_layers="0,10,20,29", mine_per_task=240, spans_per_task=6,
                                               random_per_file=4, forward_full_tasks=False,
                                               split=Split(train_share=0.75, held_out_files=0.2)))
    # the recipe at study scale: --train-steps 0 = as many as the budget and --train-epochs
    # passes over patterns.train allow (the training set is fixed once produce ends)
    train: TrainingConfig = nested(TrainingConfig(steps=0, epochs=8, batch_size=32, lr=1e-3, shuffle_window=4096),
                                   prefix="train_")
    cluster: ClusterConfig = field(default_factory=lambda: ClusterConfig(min_cluster_size=15, min_samples=5))
    intervene_per_task: int = setting(60, "Most held-out inputs per task for the intervention (sized down by the "
                                          "budget)")
    intervene_draws: int = setting(20, "Random-head draws in the intervention (20+ for an empirical p-value)")
    topic_prefix: str = setting("study.", "Topic prefix of this study run")
    # the study's own
    budget_minutes: float = setting(120.0, "Time budget for the whole study; stages are sized from measured rates")
    out_dir: Path = setting(Path("docs/study"), "Where numbers.json, README.md and the figures go")
    batch_size: int = setting(8, "Target-model inputs per forward pass")
    chunk_files: int = setting(20, "Files ingested and mined per produce round (progress is checked between rounds)")
    min_tasks: int = setting(8, "Tasks that should reach mine_per_task balanced samples (the study's target)")
    target_balanced: int = setting(200, "Balanced samples per task the study aims at (100 correct + 100 incorrect)")
    ablation_steps: int = setting(0, "Steps of each log-scaling ablation run (0 = sized by the budget)")
    eval_samples: int = setting(600, "Held-out samples for the reconstruction numbers")
    eval_heads: int = setting(8, "Heads per held-out sample in the reconstruction numbers")
    umap_heads: int = setting(4, "Heads drawn as a UMAP scatter")
    smoke: bool = setting(False, "Label every output a smoke run (tests and tiny budgets); set by itself when the "
                                 "budget is under 60 minutes")


class Study(Demo):
    name = "study"
    stages = STAGES

    def __init__(self, cfg: StudyConfig):
        super().__init__(cfg)
        self.plan: dict = dict(self.done.get("_plan", {}))

    @property
    def smoke(self) -> bool:
        return bool(self.cfg.smoke or self.cfg.budget_minutes < 60)

    def record(self, stage: str, result) -> None:
        self.done["_plan"] = self.plan
        super().record(stage, result)

    def save_plan(self) -> None:
        """Persist a stage's plan before it runs (a rerun resumes it with the same sizes)."""
        self.done["_plan"] = self.plan
        self.stages_file.write_text(json.dumps(self.done, indent=2, default=str))

    def stage_infra(self):
        states = super().stage_infra()
        if len(self.done) <= 1:  # the demo's infra stage forgot the finished stages: the plan goes too
            self.plan = {}
            self.timings = {}
        return states

    def producer_cfg(self):
        return dataclasses.replace(super().producer_cfg(), batch_size=self.cfg.batch_size)

    def trainer_cfg(self, name: str, steps: int, log_scale: bool = True, epochs: int = 1):
        """The study's recipe at a planned size: ``steps``, ``epochs`` passes, warm-up 5%."""
        from services.trainer import TrainerConfig

        recipe = dataclasses.replace(self.cfg.train, steps=steps, epochs=epochs, log_scale=log_scale,
                                     warmup_steps=self.cfg.train.warmup_steps or max(1, steps // 20))
        return self.common(TrainerConfig, train=recipe, checkpoint_every=max(20, steps // 10), name=name,
                           group=f"trainer-{name}", idle_timeout_s=20)

    def ablation_names(self) -> dict[str, str]:
        """The log arm is the main run when the raw arm can have its steps (see stage_ablate)."""
        reuse = self.plan.get("ablation_steps") == self.plan.get("train_steps")
        return {"log": self.name if reuse else f"{self.name}-ablation-log", "raw": f"{self.name}-ablation-raw"}

    def reset(self) -> None:
        import shutil

        super().reset()
        for name in (f"{self.name}-ablation-log", f"{self.name}-ablation-raw", f"{self.name}-probe"):
            shutil.rmtree(self.trainer_cfg(name, 1).run_dir, ignore_errors=True)

    # -- the budget ---------------------------------------------------------------------------
    def allot(self, stage: str) -> float:
        """Seconds for ``stage``: its share of what is left of the budget (stages before it
        that finished early leave their time to the rest)."""
        spent = sum(v for k, v in self.timings.items() if k in self.stages)
        left = max(0.0, self.cfg.budget_minutes * 60 - spent)
        rest = sum(v for k, v in SHARES.items() if k not in self.done and k != stage)
        return left * SHARES[stage] / (SHARES[stage] + rest)

    # -- stages -------------------------------------------------------------------------------
    def stage_calibrate(self):
        """Time AP-MAE's training step and embedding at the study's sizes (synthetic causal
        attention patterns; the rates do not depend on the values)."""
        import torch

        from apmae.mae import APMAE
        from apmae.train import make_optimizer, train_step

        torch.manual_seed(0)
        model = APMAE(self.cfg.train.model_config())
        x = synthetic_patterns(self.cfg.train.batch_size, self.cfg.train.pattern_size)
        opt = make_optimizer(model, 1e-4)
        train_step(model, opt, x, 1e-4)  # first step allocates
        t0, n = time.perf_counter(), 3
        for _ in range(n):
            train_step(model, opt, x, 1e-4)
        step_s = (time.perf_counter() - t0) / n
        model.eval()
        with torch.no_grad():
            model.embed(x)
            t0 = time.perf_counter()
            model.embed(x)
            embed_rate = len(x) / (time.perf_counter() - t0)
        return {"train_step_s": step_s, "embed_patterns_per_s": embed_rate, "threads": torch.get_num_threads(),
                "budget_s": self.cfg.budget_minutes * 60}

    def balance_counts(self, prod) -> dict[str, dict[str, int]]:
        from apmae.tasks import LABELLED_TASKS

        return {t: {lab: int(prod.redis.scard(prod._set(t, v))) for lab, v in (("correct", True), ("incorrect", False))}
                for t in LABELLED_TASKS}

    def train_patterns(self) -> int:
        from apmae.topics import PATTERNS_TRAIN
        from services.bus import Bus, topic_end_offsets

        return int(sum(topic_end_offsets(Bus(self.bus, "study"), PATTERNS_TRAIN).values()))

    def ingest_range(self, skip: int, n: int) -> dict:
        saved = self.cfg
        self.cfg = dataclasses.replace(saved, skip_files=skip, files=n)
        try:
            return self.stage_ingest()
        finally:
            self.cfg = saved

    def stage_produce(self, n: int | None = None):
        """Mine in chunks of files until the tasks are full, the share is spent or the corpus
        ends. ``n`` given (the live stage): the demo's single pass over n files."""
        if n is not None:
            return super().stage_produce(n)
        from services.producer import PREDICTIONS, Producer

        allot = self.allot("produce")
        cfg = self.cfg
        half = cfg.mining.mine_per_task // 2
        prod = Producer(self.producer_cfg())
        proc = prod.processor_for()
        t0 = time.monotonic()
        # a rerun continues after the files an interrupted produce already ingested (their
        # ingest is deduplicated, the producer group resumes at its committed offsets)
        requested, published = self.plan.get("produce_requested", 0), 0
        rounds: list[dict] = list(self.plan.get("produce_rounds", []))
        stop = "files"
        step_s = self.done["calibrate"]["train_step_s"]
        bar = _bar("produce", None, "file")
        try:
            while requested < cfg.files:
                k = min(cfg.chunk_files, cfg.files - requested)
                t_round = time.monotonic()
                ing = self.ingest_range(cfg.skip_files + requested, k)
                got = ing["published"]
                requested += k
                if got + ing["duplicates"] == 0:
                    stop = "corpus exhausted"
                    break
                published += got
                proc.run(max_messages=published, idle_timeout_s=60, progress=bar.update)
                counts = self.balance_counts(prod)
                full = [t for t, c in counts.items() if min(c.values()) >= half]
                elapsed = time.monotonic() - t0
                rounds.append({"files": requested, "seconds": round(elapsed, 1), "full_tasks": len(full)})
                self.plan.update(produce_requested=requested, produce_rounds=rounds)
                self.save_plan()
                bar.set_postfix_str(f"{len(full)} tasks full, {elapsed / 60:.1f}/{allot / 60:.1f} min")
                if len(full) == len(counts):
                    stop = "every task full"
                    break
                # training data the train stage's time share could use (a rough forecast)
                want_train = SHARES["train"] / SHARES["produce"] * allot / step_s * cfg.train.batch_size
                if len(full) >= cfg.min_tasks and self.train_patterns() >= want_train:
                    stop = f"{len(full)} tasks full and enough training patterns"
                    break
                if elapsed + (time.monotonic() - t_round) > allot:
                    stop = "budget share spent"
                    break
        finally:
            bar.close()
        seconds = time.monotonic() - t0
        by_task: dict[str, dict[str, int]] = {}
        for s in PREDICTIONS.collect()[0].samples:
            if s.name.endswith("_total") and s.labels.get("model") == prod.lm.name:
                by_task.setdefault(s.labels["task"], {})[s.labels["result"]] = int(s.value)
        n_pred = sum(v for c in by_task.values() for v in c.values())
        self.plan["files_requested"] = requested
        if not rounds:
            raise RuntimeError(f"produce mined nothing ({stop}): check --corpus and --skip-files")
        return {"files_requested": requested, "files_published": published, "files": proc.processed,
                "stopped": stop, "seconds": seconds, "allot_s": allot, "rounds": rounds,
                "predictions": by_task, "predictions_per_s": n_pred / max(seconds, 1e-9),
                "mined": self.balance_counts(prod), "train_patterns": self.train_patterns(),
                "mode": prod.mode, "model": prod.lm.name, "heads_per_sample": prod.lm.heads_per_sample,
                "mined_heads": len(prod.mine_layers) * len(prod.mine_heads)}

    def stage_encode(self):
        """The demo's stage, refusing to record an empty result: the first study run's encode
        read nothing (the broker failed every listing of patterns.mine), was recorded as done
        with 0 embedded, and every later stage worked on nothing."""
        out = super().stage_encode()
        mined = sum(n for c in self.done.get("produce", {}).get("mined", {}).values() for n in c.values())
        if out["embedded"] == 0 and mined > 0:
            raise RuntimeError(f"encode embedded nothing although produce mined {mined} samples: the broker could "
                               "not be read (see <state>/infra/broker.log); fix it and rerun to resume here")
        return out

    def probe_step_s(self) -> float:
        """Seconds per training step on the real pipeline (broker, prefetch, decode): a 40-step
        run of its own. The synthetic calibration misses the input side; the first study's
        training ran at ~0.36 s/step where it measured 0.084."""
        from services.trainer import Trainer

        if "train_step_s_probe" not in self.plan:
            out = Trainer(self.trainer_cfg(f"{self.name}-probe", 40)).run()
            self.plan["train_step_s_probe"] = out["loop_seconds"] / max(1, out["step"])
            self.save_plan()
        return self.plan["train_step_s_probe"]

    def stage_train(self):
        from services.trainer import Trainer

        if "train_steps" not in self.plan:
            allot, step_s = self.allot("train"), self.probe_step_s()
            by_time = max(1, int(allot * 0.9 / step_s))  # checkpoints, the idle wait at the end
            per_pass = max(1, self.train_patterns() // self.cfg.train.batch_size)
            by_data = per_pass * self.cfg.train.epochs
            steps = self.cfg.train.steps or min(by_time, by_data)
            self.plan.update(train_steps=steps, train_steps_by_time=by_time, train_steps_by_data=by_data,
                             train_steps_per_pass=per_pass, train_allot_s=allot,
                             # one pass more than the steps need: a pass drops its last partial batch
                             train_epochs=math.ceil(steps / per_pass) + 1)
            self.save_plan()  # a rerun resumes with the same schedule
        steps = self.plan["train_steps"]
        out = Trainer(self.trainer_cfg(self.name, steps, epochs=self.plan["train_epochs"])).run()
        limited = ("flag" if self.cfg.train.steps else
                   f"data ({self.cfg.train.epochs} passes over patterns.train)"
                   if self.plan["train_steps_by_data"] < self.plan["train_steps_by_time"] else "time")
        return {**out, "planned_steps": steps, "passes": steps / self.plan["train_steps_per_pass"],
                "limited_by": limited, "shuffle_window": self.cfg.train.shuffle_window}

    def stage_ablate(self):
        """Log scaling on and off (paper 4.2): the same steps, data, batch and learning rate.

        The main run is the log arm when the budget affords a raw run of its steps; otherwise
        both arms are trained anew at the steps it affords."""
        from services.trainer import Trainer

        if "ablation_steps" not in self.plan:
            allot, step_s = self.allot("ablate"), self.probe_step_s()
            main = self.plan["train_steps"]
            if self.cfg.ablation_steps:
                steps = self.cfg.ablation_steps
            elif allot * 0.9 / step_s >= main:
                steps = main
            else:
                steps = max(1, int(allot * 0.9 / 2 / step_s))
            self.plan["ablation_steps"] = steps
            self.save_plan()
        steps = self.plan["ablation_steps"]
        epochs = math.ceil(steps / self.plan["train_steps_per_pass"]) + 1
        out = {}
        for label, name in self.ablation_names().items():
            if name == self.name:
                out[label] = {"same_run_as": "main", **self.done["train"]}
                continue
            out[label] = Trainer(self.trainer_cfg(name, steps, log_scale=label == "log", epochs=epochs)).run()
        return out

    def checkpoint(self, name: str) -> Path:
        from services.trainer import latest_checkpoint

        path = latest_checkpoint(self.trainer_cfg(name, 1).run_dir)
        if path is None:
            raise RuntimeError(f"no AP-MAE checkpoint for run {name}")
        return path

    def stage_evaluate(self):
        """Reconstruction on mined samples (none trained AP-MAE: split by sample), the
        log-scaling ablation against each run's own baseline, and Table 2."""
        from apmae import evaluate as E
        from apmae.mae import from_pretrained
        from apmae.split import is_held_out_file
        from apmae.topics import PATTERNS_MINE, SAMPLES
        from services.bus import Bus, Message, read_range
        from services.evaluate import load_patterns

        out = self.cfg.out_dir
        out.mkdir(parents=True, exist_ok=True)
        loaded = load_patterns(self.bus, f"topic:{PATTERNS_MINE.name}", self.cfg.eval_samples,
                               self.cfg.train.pattern_size, self.cfg.eval_heads, seed=0)
        if not loaded:
            return {"skipped": "no mined patterns"}
        target, (pats, ids) = next(iter(loaded.items()))
        runs = {"main": self.name, **{f"ablation-{k}": v for k, v in self.ablation_names().items()}}
        models, steps = {}, {}
        for label, name in runs.items():
            model, meta = from_pretrained(self.checkpoint(name))
            models[label], steps[label] = model, meta.get("step")
        res = {}
        with _bar("evaluate", len(models) + 1, "model") as bar:
            for label, model in models.items():
                same = next((k for k in res if runs[k] == runs[label]), None)  # the main run as the log arm
                res[label] = (dict(res[same], same_run_as=same) if same else
                              {**paired_reconstruction(model, pats, ids), "checkpoint_step": steps[label],
                               "log_scale": bool(model.cfg.log_scale)})
                bar.update()
            file_of = {m.record.id: m.record.file_id for m in read_range(Bus(self.bus, "study"), SAMPLES)
                       if isinstance(m, Message)}
            split = self.producer_cfg().split
            keep = [i for i, s in enumerate(ids) if s in file_of and is_held_out_file(file_of[s], split)]
            by_file = (paired_reconstruction(models["main"], pats[keep], [ids[i] for i in keep])
                       if len({ids[i] for i in keep}) >= 10 else
                       {"skipped": f"{len({ids[i] for i in keep})} samples of held-out files (< 10)"})
            distinct = {k: m for k, m in models.items() if "same_run_as" not in res[k]}
            table = E.cross_evaluation(distinct, {target: pats}, 0, {target: ids})
            bar.update()
        E.figure1(models["main"], pats[0], out / "figure1.png", title="AP-MAE (main run), a held-out pattern")
        return {"target_model": target, "heads_per_sample": self.cfg.eval_heads, "runs": res,
                "held_out_files": by_file, "cross_eval": table}

    def intervene_cfg(self):
        """The demo's intervention with the study's draws; inputs per task sized from the
        measured forward rate (each input is predicted once per condition)."""
        cfg = super().intervene_cfg()
        report = json.loads((self.dir / "report" / "report.json").read_text())
        fitted = sum("importance" in t for m in report["models"].values() for t in m["tasks"])
        rate = self.done["produce"]["predictions_per_s"]
        conditions = self.cfg.intervene_draws + 3  # unchanged, top, neutral, random draws
        per_task = int(self.allot("intervene") * 0.8 * rate / max(1, fitted) / conditions)
        per_task = max(min(10, self.cfg.intervene_per_task), min(self.cfg.intervene_per_task, per_task))
        self.plan["intervene_per_task"] = per_task
        skip = self.cfg.skip_files + 3 * (self.plan.get("files_requested", self.cfg.files) + self.cfg.live_files)
        return dataclasses.replace(cfg, per_task=per_task, skip_files=skip, max_files=max(400, 40 * per_task))

    def stage_intervene(self):
        report = self.dir / "report" / "report.json"
        tasks = json.loads(report.read_text())["models"].values() if report.exists() else []
        if not any("importance" in t for m in tasks for t in m["tasks"]):
            return {"skipped": "no task has a fitted classifier (so no SHAP heads to zero)"}
        return super().stage_intervene()

    def stage_live(self):
        saved = self.cfg
        self.cfg = dataclasses.replace(saved, files=self.plan.get("files_requested", saved.files))
        try:
            return super().stage_live()
        finally:
            self.cfg = saved

    def stage_numbers(self):
        return {"path": str(write_numbers(self))}

    def run(self) -> dict:
        import os

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return super().run()


def synthetic_patterns(n: int, size: int, seed: int = 0):
    """(n, size, size) causal softmax rows of random logits: the shape and support of real
    attention patterns, for timing only."""
    import torch

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, size, size, generator=g) * 2
    upper = torch.triu(torch.ones(size, size, dtype=torch.bool), 1)
    return torch.softmax(logits.masked_fill(upper, float("-inf")), -1)


def paired_reconstruction(model, pats, ids: list[str], share: float = 0.5, seed: int = 0,
                          resamples: int = 1000) -> dict:
    """AP-MAE vs the mean-patch baseline on the same held-out samples and masks.

    The baseline's mean patch comes from ``share`` of the samples (by sample hash); both are
    scored on the other samples. The ratio's 95% CI resamples samples (a sample's heads
    together), as do the CIs of the two means."""
    from apmae import evaluate as E

    fit_idx, ev_idx = E.split_samples(ids, share, seed)
    if not fit_idx or not ev_idx:
        return {"skipped": f"{len(set(ids))} samples: too few to split for the baseline"}
    ev, ev_ids = pats[ev_idx], [ids[i] for i in ev_idx]
    losses = E.reconstruction_losses(model, ev, seed)
    base = E.mean_patch_losses(model, pats[fit_idx], ev, seed)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(ev_ids):
        groups.setdefault(s, []).append(i)
    la, lb = losses.numpy(), base.numpy()
    sa = np.array([la[g].sum() for g in groups.values()])
    sb = np.array([lb[g].sum() for g in groups.values()])
    pick = np.random.default_rng(seed).integers(0, len(sa), size=(resamples, len(sa)))
    ratios = sa[pick].sum(1) / sb[pick].sum(1)
    diff_means = np.array([(la[g] - lb[g]).mean() for g in groups.values()])
    diffs = diff_means[pick].mean(1)
    return {"apmae": E.summary(losses, ev_ids, seed), "mean_patch_baseline": E.summary(base, ev_ids, seed),
            "ratio": float(la.mean() / lb.mean()),
            "ratio_ci95": [float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))],
            "apmae_minus_baseline_ci95": [float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))],
            "n_samples": len(groups), "n_patterns": len(ev_ids),
            "baseline_fit_samples": len({ids[i] for i in fit_idx}), "split": "by_sample",
            "ci_method": "bootstrap over samples (95%)"}


def launch_note(done: dict, cfg: StudyConfig) -> str:
    lines = ["", f"apmae study finished{' (SMOKE RUN: not results)' if cfg.smoke or cfg.budget_minutes < 60 else ''}",
             "-" * 60]
    for stage, secs in done.get("_timings", {}).items():
        lines.append(f"  {stage:10s} {secs:8.1f} s")
    lines.append(f"  numbers: {done.get('numbers', {}).get('path')}")
    return "\n".join(lines)


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


def cluster_numbers(study: Study) -> dict:
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


def task_numbers(study: Study) -> dict:
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
    return dict(sorted(out.items()))


def intervention_numbers(study: Study) -> dict:
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


def live_numbers(study: Study) -> dict:
    lv = study.done.get("live", {})
    live = dict(lv.get("live", {}))
    live.update({"in_sample": False, "files_streamed": lv.get("ingested"), "scores": lv.get("scores"),
                 "in_sample_scores_left_out": lv.get("in_sample_scores")})
    if not live.get("n"):
        live["verdict"] = "no out-of-sample live score with a known truth: no live accuracy"
    return live


def write_numbers(study: Study) -> Path:
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


def draw_figures(study: Study, numbers: dict, out: Path) -> list[str]:
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

    def recon(path: Path) -> None:
        plt = _plt()
        labels = [k for k in ("main", "ablation-log", "ablation-raw") if "ratio" in runs.get(k, {})]
        vals = [runs[k]["ratio"] for k in labels]
        err = [[v - runs[k]["ratio_ci95"][0] for k, v in zip(labels, vals, strict=False)],
               [runs[k]["ratio_ci95"][1] - v for k, v in zip(labels, vals, strict=False)]]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(labels, vals, yerr=err, capsize=4, color=["#2b6cb0", "#48bb78", "#ed8936"][:len(labels)])
        ax.axhline(1, color="black", lw=1, label="mean-patch baseline (1.0)")
        ax.axhline(0.5, color="gray", ls="--", lw=1, label="target 0.5")
        ax.set_ylabel("AP-MAE loss / own baseline")
        ax.set_title(f"reconstruction on held-out samples, n = {runs[labels[0]]['n_samples']} (95% CI)")
        ax.legend(fontsize=8)
        save_figure(fig, path)

    if runs:
        attempt("reconstruction.png", recon)
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


def umap_panel(study: Study, heads: dict, path: Path) -> None:
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
    L.append("| task | n balanced | CV accuracy [95% CI] | chance | verdict | LLM correct rate, all candidates [95% CI] (n) |")
    L.append("|---|---|---|---|---|---|")
    for task, row in n["tasks"].items():
        llm = f"{_num(row['llm_correct_rate'])} {fmt_ci(row['llm_correct_ci95'])} ({row['llm_candidates_n']})"
        if "cv_accuracy" in row:
            L.append(f"| {task} | {row['n_balanced']} | {row['cv_accuracy']:.3f} {fmt_ci(row['ci95'])} | 0.5 | "
                     f"{row['verdict']} | {llm} |")
        else:
            L.append(f"| {task} | {row['n_balanced']} | skipped: {row['skipped']} | 0.5 | | {llm} |")
    sig = [t for t, row in n["tasks"].items() if row.get("signal")]
    L.append("")
    L.append(f"Tasks with a CI above chance: {', '.join(sig) if sig else '**none: no signal**'}.")
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
