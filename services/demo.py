"""``apmae demo``: the whole pipeline on the embedded default, on one machine, with a report.

Stages (each resumable: a finished stage is recorded in ``<state>/demo/stages.json`` and
skipped when the demo is started again, as long as the in-memory broker still holds its
topics):

 1. infra       start the embedded broker, Redis and Prometheus
 2. ingest      a slice of a real corpus (the JDK's src.zip by default)
 3. produce     the local default model (SmolLM2-135M, prefix mode) mines tasks, predicts,
                labels and captures attention
 4. train       a small AP-MAE on patterns.train
 5. encode      CLS embeddings of patterns.mine
 6. cluster     per-head UMAP + HDBSCAN through the Kafka job queue (one worker per core)
 7. classify    per-task CatBoost, 10-fold CV vs baseline, SHAP
 8. intervene   zero each task's top-SHAP heads (and random / neutral heads) in the target
                model on held-out files: does the correctness rate move?
 9. live        a few new files stream through produce -> encode -> assign -> score; the live
                accuracy counts only samples of files no classifier was fit on (out of
                sample), scores of fit rows are counted apart as in-sample
10. report      one HTML page with every figure and the numbers behind them

The JDK sources are in StarCoder2's (and probably SmolLM2's) training data, so correctness
rates are inflated; the demo shows the machinery, not a contamination-free measurement.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from apmae.classify import ClassifierConfig
from apmae.cluster import ClusterConfig
from apmae.config import BusConfig, nested, setting
from apmae.mining import MiningConfig
from apmae.recipe import TrainingConfig
from services import infra

log = logging.getLogger("apmae.demo")


@dataclass(frozen=True)
class DemoConfig:
    # the embedded servers and the state directory (--state-dir, --kafka-port, --ephemeral...);
    # the study at full size needs --ephemeral (the durable engine's listing made a read of
    # ~8,000 record batches take 42 s)
    infra: infra.InfraConfig = nested(infra.InfraConfig())
    corpus: str = setting("", "Corpus (default: the JDK's src.zip)")
    files: int = setting(10, "Files to mine")
    live_files: int = setting(2, "Extra files streamed through the live path at the end")
    skip_files: int = setting(400, "Corpus files to skip first (the JDK zip starts with tiny package-info files)")
    model: str = setting("local:smollm2", "Target model (local:smollm2, a directory, or a hub id)")
    # what is mined: the library's config, at the demo's size (--mine-layers, --mine-per-task...)
    mining: MiningConfig = nested(MiningConfig(mine_layers="0,6,12,18,24,29", mine_per_task=30, spans_per_task=2,
                                               random_per_file=6))
    # AP-MAE's training recipe, the library's own config behind --train-* flags (--train-steps,
    # --train-batch-size, --train-variant, --train-pattern-size: also the mined patterns' size);
    # a short demo run needs a higher rate than 1.5e-4 x 32/50
    train: TrainingConfig = nested(TrainingConfig(steps=100, batch_size=32, lr=1e-3), prefix="train_")
    # the clustering and the classifier: the library's own configs, at the demo's scale (the
    # paper's min_cluster_size 25 / min_samples 20 need ~110k points per head)
    cluster: ClusterConfig = field(default_factory=lambda: ClusterConfig(min_cluster_size=10, min_samples=5))
    classifier: ClassifierConfig = field(default_factory=lambda: ClassifierConfig(iterations=300))
    intervene_per_task: int = setting(12, "Held-out inputs per task for the head intervention (0 = skip it)")
    intervene_k: int = setting(5, "Heads zeroed per condition in the intervention")
    intervene_draws: int = setting(2, "Random-head draws in the intervention (the study uses 20+)")
    fresh: bool = setting(False, "Forget finished stages and start over")
    topic_prefix: str = setting("demo.", "Topic prefix of this demo run")

    @property
    def state_dir(self) -> Path:
        return self.infra.state_dir


STAGES = ("infra", "ingest", "produce", "train", "encode", "cluster", "classify", "intervene", "live", "report")


class Demo:
    name = "demo"  # state folder, AP-MAE run and checkpoint name (the study subclasses this)
    stages = STAGES

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.dir = cfg.state_dir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stages_file = self.dir / "stages.json"
        self.done: dict = {} if cfg.fresh or not self.stages_file.exists() else json.loads(self.stages_file.read_text())
        self.infra = cfg.infra
        self.bus = BusConfig(bootstrap_servers=self.infra.bootstrap_servers, redis_url=self.infra.redis_url,
                             state_dir=cfg.state_dir, topic_prefix=cfg.topic_prefix, group_poll_interval_ms=10_000)
        self.timings: dict[str, float] = dict(self.done.get("_timings", {}))

    def record(self, stage: str, result) -> None:
        self.done[stage] = result
        self.done["_timings"] = self.timings
        self.stages_file.write_text(json.dumps(self.done, indent=2, default=str))

    def common(self, cls, **kw):
        return cls(**{f.name: getattr(self.bus, f.name) for f in dataclasses.fields(BusConfig)}, **kw)

    # -- stages -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget a previous run: Redis state under this demo's prefix and its artifacts.

        Redis and the artifact store persist, the embedded broker does not: done marks,
        dedupe sets and checkpoints of a run whose topics are gone would make the new run
        skip its inputs or resume at offsets that no longer exist.
        """
        import shutil

        import redis

        from services.trainer import TrainerConfig

        prefix = self.cfg.topic_prefix
        if not prefix:  # every tenant's keys would match: refuse rather than delete them
            raise ValueError("the demo's reset needs a topic prefix (--topic-prefix); with none it would delete "
                             "every tenant's Redis state")
        r = redis.Redis.from_url(self.bus.redis_url)
        # keys are apmae:<kind>:<prefix>... (done marks, mining sets, registry entries under a
        # kind); the old pattern apmae:*<prefix>* also matched other tenants whose names merely
        # contain this prefix
        keys = list(r.scan_iter(match=f"apmae:*:{prefix}*", count=1000))
        for i in range(0, len(keys), 500):
            r.delete(*keys[i:i + 500])
        art = self.bus.artifacts_dir
        run_dir = self.common(TrainerConfig, name=self.name).run_dir
        for d in (run_dir, art / "clusters", art / "classifier", self.dir / "report"):
            shutil.rmtree(d, ignore_errors=True)

    def stage_infra(self):
        states = infra.up(self.infra)
        if states["broker"].startswith("started") or self.cfg.fresh:
            if len(self.done) > 1:
                log.warning("the embedded broker was (re)started: its in-memory topics are gone, starting over")
            self.done = {}
            self.reset()
        from services.runtime import start_service

        start_service(self.bus, "demo")
        return states

    def stage_ingest(self):
        import itertools

        from apmae.corpus import Limits, open_corpus
        from services.ingest import Ingest, IngestConfig, corpus_path

        cfg = self.common(IngestConfig, corpus=self.cfg.corpus)
        job = Ingest(cfg)
        job.bus.ensure_topics()
        files = open_corpus(corpus_path(cfg), job.stats, Limits(max_file_bytes=200_000))
        files = (f for f in files if 4_000 < len(f.content) < 60_000)  # long enough for 256 tokens, not huge
        job.ingest(itertools.islice(files, self.cfg.skip_files, self.cfg.skip_files + self.cfg.files))
        job.bus.close()
        return job.summary()

    def producer_cfg(self):
        from services.producer import ProducerConfig

        return self.common(ProducerConfig, model=self.cfg.model, mining=self.cfg.mining,
                           files_per_batch=1, length=self.cfg.train.pattern_size)

    def stage_produce(self, n: int | None = None):
        from services.producer import Producer

        prod = Producer(self.producer_cfg())
        n = n or self.cfg.files
        try:
            with _bar("produce", n, "file") as bar:
                processed = prod.processor_for().run(max_messages=n, idle_timeout_s=60, progress=bar.update)
        except BaseException:
            prod.close(quietly=True)  # the error that stopped it is the one to see
            raise
        prod.close()  # its threads and client buffers do not outlive the stage
        from services.producer import PREDICTIONS

        by_task: dict[str, dict[str, int]] = {}
        for s in PREDICTIONS.collect()[0].samples:
            if s.name.endswith("_total"):
                by_task.setdefault(s.labels["task"], {})[s.labels["result"]] = int(s.value)
        return {"files": processed, "predictions": by_task, "mode": prod.mode, "model": prod.lm.name,
                "heads_per_sample": prod.lm.heads_per_sample, "mined_heads": len(prod.mine_layers) * len(prod.mine_heads)}

    def stage_train(self):
        from services.trainer import Trainer, TrainerConfig

        cfg = self.common(TrainerConfig, train=self.cfg.train, checkpoint_every=40, name=self.name, idle_timeout_s=20)
        return Trainer(cfg).run()

    def stage_encode(self):
        from services.encoder import Encoder, EncoderConfig

        with _bar("encode", None, "pattern") as bar:
            n = Encoder(self.common(EncoderConfig, checkpoint=self.name)).processor().run(
                idle_timeout_s=60, until_caught_up=True, progress=bar.update)
        return {"embedded": n}

    def cluster_cfg(self):
        import os

        from services.cluster import ClusterServiceConfig

        return self.common(ClusterServiceConfig, cluster=self.cfg.cluster, processes=max(1, min(2, os.cpu_count() or 1)))

    def stage_cluster(self):
        from services.bus import RunLimits
        from services.cluster import plan, run_workers

        cfg = self.cluster_cfg()
        p = plan(cfg)
        jobs = run_workers(cfg, RunLimits(idle_timeout_s=30), jobs=p["jobs"])
        return {**p, "fitted": jobs}

    def classify_cfg(self):
        from services.classifier import ClassifyConfig

        return self.common(ClassifyConfig, classifier=self.cfg.classifier, min_rows=10,
                           out_dir=self.dir / "report")

    def stage_classify(self):
        from services.classifier import fit_all

        return fit_all(self.classify_cfg())

    def intervene_cfg(self):
        from services.intervene import InterveneConfig

        p = self.producer_cfg()
        return InterveneConfig(**{f.name: getattr(p, f.name) for f in dataclasses.fields(p)},
                               corpus=self.cfg.corpus, per_task=self.cfg.intervene_per_task, k=self.cfg.intervene_k,
                               random_draws=self.cfg.intervene_draws,
                               skip_files=self.cfg.skip_files + 3 * (self.cfg.files + self.cfg.live_files),
                               report=self.dir / "report" / "report.json", out_dir=self.dir / "report")

    def stage_intervene(self):
        from services.intervene import run

        if not self.cfg.intervene_per_task:
            return {"skipped": "intervene_per_task = 0"}
        result = run(self.intervene_cfg())
        return {"k": result["k"], "summary": result["summary"]}

    def stage_live(self):
        from apmae.scoring import live_accuracy
        from apmae.topics import SAMPLES, SCORES
        from services.bus import Bus, Message, read_range
        from services.classifier import Scorer
        from services.cluster import Assigner
        from services.encoder import Encoder, EncoderConfig

        before = self.cfg.files
        self.cfg = dataclasses.replace(self.cfg, skip_files=self.cfg.skip_files + before, files=self.cfg.live_files)
        ing = self.stage_ingest()
        self.stage_produce(self.cfg.live_files)
        # each stage reads its input to the end (the one before it has finished)
        enc = Encoder(self.common(EncoderConfig, checkpoint=self.name)).processor().run(
            idle_timeout_s=60, until_caught_up=True)
        assigned = Assigner(self.cluster_cfg()).processor().run(idle_timeout_s=60, until_caught_up=True)
        scored = Scorer(self.classify_cfg()).processor().run(idle_timeout_s=60, until_caught_up=True)
        bus = Bus(self.bus)
        scores = [m.record for m in read_range(bus, SCORES) if isinstance(m, Message)]
        # the scorer's group starts at the earliest offset, so it also scores the rows the
        # classifier was fit on: accuracy only on samples of files no classifier saw
        file_of = {m.record.id: m.record.file_id for m in read_range(bus, SAMPLES) if isinstance(m, Message)}
        report = self.dir / "report" / "report.json"
        fit_files = set(json.loads(report.read_text()).get("fit_file_ids", [])) if report.exists() else set()
        live = live_accuracy(scores, file_of, fit_files)
        return {"ingested": ing["published"], "embedded": enc, "assignment_messages": assigned,
                "classifier_inputs": scored, "scores": len(scores), "live_accuracy": live["accuracy"],
                "live": live, "in_sample_scores": sum(bool(s.in_sample) for s in scores)}

    def stage_report(self):
        from services.report import write_report

        return {"path": str(write_report(self))}

    # -- driver -----------------------------------------------------------------------------
    def run(self) -> dict:
        from tqdm import tqdm

        bar = tqdm(self.stages, desc=self.name, unit="stage")
        for stage in bar:
            bar.set_postfix_str(stage)
            if stage != "infra" and stage in self.done:
                continue
            t0 = time.perf_counter()
            result = getattr(self, f"stage_{stage}")()
            self.timings[stage] = time.perf_counter() - t0
            self.record(stage, result)
        return self.done


SMOKE_NOTE = ("smoke run: the demo's numbers show the machinery at a scale too small to mean anything; "
              "the study's numbers (apmae study) are in docs/study/README.md and docs/study/numbers.json")


def _bar(desc: str, total: int | None, unit: str):
    from tqdm import tqdm

    return tqdm(desc=desc, total=total, unit=unit, leave=False)


def summary(done: dict) -> str:
    lines = ["", "apmae demo finished", "-" * 60,
             f"  {SMOKE_NOTE}"]
    for stage, secs in done.get("_timings", {}).items():
        lines.append(f"  {stage:10s} {secs:8.1f} s")
    tr = done.get("train", {})
    lines.append(f"  AP-MAE: {tr.get('step')} steps, final loss {tr.get('loss')} [smoke run]")
    cl = done.get("cluster", {})
    lines.append(f"  clusters: {cl.get('fitted')} heads fitted (version {cl.get('version')}) [smoke run]")
    for m in done.get("classify", {}).get("models", {}).values():
        for t in m["tasks"]:
            if "mean" in t:
                lo, hi = t["ci95"]
                lines.append(f"  {t['task']:20s} classifier {t['mean']:.2f} [{lo:.2f}, {hi:.2f}] vs chance "
                             f"{t['chance_level']:.2f}, n = {t['n']} (LLM correct {t['llm_correct_rate']:.2f}) [smoke run]")
    lines.append(f"  report: {done.get('report', {}).get('path')}")
    return "\n".join(lines)


