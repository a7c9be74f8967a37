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
12. diagnose    where the reconstruction target was missed: short runs that change one
                thing each (learning rate / 3 and x 3, patches of 64, no shuffle) beside the
                main recipe at the same steps, each against its own baseline; what is left
                of the budget sizes them
13. numbers     ``<out>/numbers.json``, ``<out>/README.md`` and the PNG figures beside them

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

from apmae.cluster import ClusterConfig
from apmae.config import nested, setting
from apmae.mining import MiningConfig
from apmae.recipe import TrainingConfig
from apmae.split import Split
from services.demo import Demo, DemoConfig, _bar

log = logging.getLogger("apmae.study")

STAGES = ("infra", "calibrate", "produce", "train", "encode", "cluster", "classify", "ablate", "evaluate",
          "intervene", "live", "diagnose", "numbers")
# share of the budget per stage (infra, calibrate and numbers take seconds and are not budgeted)
# Produce gets the most: measured on this 2-core machine (SmolLM2 ~2 samples/s, AP-MAE small 0.15 s/step),
# training is limited by its data (one pass over patterns.train, ~a few hundred steps), not by time.
# The raw ablation arm repeats the main run's steps, so ablate's share is about train's.
SHARES = {"produce": 0.55, "train": 0.11, "encode": 0.06, "cluster": 0.06, "classify": 0.05, "ablate": 0.09,
          "evaluate": 0.02, "intervene": 0.07, "live": 0.02, "diagnose": 0.06}


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

    live_pass = False  # set while the live stage produces

    def producer_cfg(self):
        cfg = dataclasses.replace(super().producer_cfg(), batch_size=self.cfg.batch_size)
        if self.live_pass:
            # the live files are mined whatever the quotas: with the tasks full, a live file's
            # candidates were neither run nor mined, and the first full study scored 3 live rows
            cfg = dataclasses.replace(cfg, mining=dataclasses.replace(cfg.mining, mine_per_task=10**9,
                                                                      forward_full_tasks=True))
        return cfg

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
        for name in (f"{self.name}-ablation-log", f"{self.name}-ablation-raw", f"{self.name}-probe",
                     *(f"{self.name}-diag-{label}" for label in self.DIAGNOSES)):
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
        except BaseException:
            prod.close(quietly=True)  # the error that stopped it is the one to see
            raise
        finally:
            bar.close()
        prod.close()  # its threads and client buffers do not outlive the stage (Redis stays usable)
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

    def passes_for(self, steps: int) -> int:
        """Passes over patterns.train a run of ``steps`` may read: one more than the steps
        need, since a pass drops its last partial batch."""
        return math.ceil(steps / self.plan["train_steps_per_pass"]) + 1

    def stage_train(self):
        from services.trainer import Trainer

        if "train_steps" not in self.plan:
            allot, step_s = self.allot("train"), self.probe_step_s()
            by_time = max(1, int(allot * 0.9 / step_s))  # checkpoints, the idle wait at the end
            per_pass = max(1, self.train_patterns() // self.cfg.train.batch_size)
            by_data = per_pass * self.cfg.train.epochs
            steps = self.cfg.train.steps or min(by_time, by_data)
            self.plan.update(train_steps=steps, train_steps_by_time=by_time, train_steps_by_data=by_data,
                             train_steps_per_pass=per_pass, train_allot_s=allot)
            self.plan["train_epochs"] = self.passes_for(steps)
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
        epochs = self.passes_for(steps)
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

    def held_out_set(self):
        """(target model, patterns (N, S, S), their sample ids) of ``eval_samples`` mined
        samples, ``eval_heads`` heads each (none of them trained AP-MAE), or None."""
        from apmae.topics import PATTERNS_MINE
        from services.evaluate import load_patterns

        loaded = load_patterns(self.bus, f"topic:{PATTERNS_MINE.name}", self.cfg.eval_samples,
                               self.cfg.train.pattern_size, self.cfg.eval_heads, seed=0)
        if not loaded:
            return None
        target, (pats, ids) = next(iter(loaded.items()))
        return target, pats, ids

    def stage_evaluate(self):
        """Reconstruction on mined samples (none trained AP-MAE: split by sample), the
        log-scaling ablation against each run's own baseline, and Table 2."""
        from apmae import evaluate as E
        from apmae.mae import from_pretrained
        from apmae.split import is_held_out_file
        from apmae.topics import SAMPLES
        from services.bus import Bus, Message, read_range

        out = self.cfg.out_dir
        out.mkdir(parents=True, exist_ok=True)
        held = self.held_out_set()
        if held is None:
            return {"skipped": "no mined patterns"}
        target, pats, ids = held
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
                              {**E.paired_reconstruction(model, pats, ids), "checkpoint_step": steps[label],
                               "log_scale": bool(model.cfg.log_scale)})
                bar.update()
            file_of = {m.record.id: m.record.file_id for m in read_range(Bus(self.bus, "study"), SAMPLES)
                       if isinstance(m, Message)}
            split = self.producer_cfg().split
            keep = [i for i, s in enumerate(ids) if s in file_of and is_held_out_file(file_of[s], split)]
            by_file = (E.paired_reconstruction(models["main"], pats[keep], [ids[i] for i in keep])
                       if len({ids[i] for i in keep}) >= 10 else
                       {"skipped": f"{len({ids[i] for i in keep})} samples of held-out files (< 10)"})
            distinct = {k: m for k, m in models.items() if "same_run_as" not in res[k]}
            table = E.cross_evaluation(distinct, {target: pats}, 0, {target: ids})
            bar.update()
        E.figure1(models["main"], pats[0], out / "figure1.png", title="AP-MAE (main run), a held-out pattern")
        return {"target_model": target, "heads_per_sample": self.cfg.eval_heads, "runs": res,
                "held_out_files": by_file, "cross_eval": table}

    DIAGNOSES = ("reference", "lr_x0.3", "lr_x3", "patch_64", "no_shuffle")

    @staticmethod
    def diagnosis_change(label: str, recipe: TrainingConfig) -> dict:
        """The recipe fields a diagnosis run changes (no shuffle: a window of one batch)."""
        from apmae.train import scaled_lr

        lr = recipe.lr or scaled_lr(recipe.batch_size)
        return {"reference": {}, "lr_x0.3": {"lr": lr * 0.3}, "lr_x3": {"lr": lr * 3.0}, "patch_64": {"patch_size": 64},
                "no_shuffle": {"shuffle_window": recipe.batch_size}}[label]

    def stage_diagnose(self):
        """Why the reconstruction target (ratio <= 0.5) was missed, if it was: the main recipe
        at fewer steps ("reference": the steps trend beside the main run) and one change at a
        time at those steps, each against its own mean-patch baseline on the same held-out
        samples. Patches of 64 rather than 16: a 16-patch run costs ~4x a step (136 patches
        instead of 36), which the budget left here cannot pay."""
        from apmae import evaluate as E
        from apmae.mae import from_pretrained
        from services.trainer import Trainer

        main = self.done.get("evaluate", {}).get("runs", {}).get("main", {})
        if "ratio_ci95" not in main:
            return {"skipped": "no held-out reconstruction to diagnose"}
        if main["ratio_ci95"][1] <= 0.5:
            return {"skipped": "the target is reached: nothing to diagnose"}
        if "diagnose_steps" not in self.plan:
            allot, step_s = self.allot("diagnose"), self.probe_step_s()
            self.plan["diagnose_steps"] = min(self.plan["train_steps"],
                                              int(allot * 0.75 / len(self.DIAGNOSES) / step_s))
            self.save_plan()
        steps = self.plan["diagnose_steps"]
        if steps < 50:
            return {"skipped": f"the budget left affords {steps} steps per run (< 50)", "steps": steps}
        held = self.held_out_set()
        if held is None:
            return {"skipped": "no mined patterns"}
        _, pats, ids = held
        epochs = self.passes_for(steps)
        recipe = self.cfg.train
        out = {"steps": steps, "main_steps": self.plan["train_steps"], "runs": {}}
        with _bar("diagnose", len(self.DIAGNOSES), "run") as bar:
            for label in self.DIAGNOSES:
                name = f"{self.name}-diag-{label}"
                cfg = self.trainer_cfg(name, steps, epochs=epochs)
                fields = self.diagnosis_change(label, recipe)
                cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **fields))
                trained = Trainer(cfg).run()
                model, _ = from_pretrained(self.checkpoint(name))
                out["runs"][label] = {**E.paired_reconstruction(model, pats, ids), "change": fields,
                                      "train_seconds": trained["seconds"], "last_train_loss": trained["loss"]}
                bar.update()
        return out

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
        self.live_pass = True
        try:
            return super().stage_live()
        finally:
            self.cfg, self.live_pass = saved, False

    def stage_numbers(self):
        from services.study_numbers import write_numbers

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


def launch_note(done: dict, cfg: StudyConfig) -> str:
    lines = ["", f"apmae study finished{' (SMOKE RUN: not results)' if cfg.smoke or cfg.budget_minutes < 60 else ''}",
             "-" * 60]
    for stage, secs in done.get("_timings", {}).items():
        lines.append(f"  {stage:10s} {secs:8.1f} s")
    lines.append(f"  numbers: {done.get('numbers', {}).get('path')}")
    return "\n".join(lines)
