"""``apmae classify fit`` / ``apmae classify serve``: correctness prediction from clusters.

fit: joins the ``samples`` topic (task, label) with the ``assignments`` topic (one cluster
id per head and sample, of one cluster version) into feature rows, and per (target model,
task) runs the paper's fit protocol (:func:`apmae.classify.fit_task`: balanced rows, 10-fold
CV with a Wilson interval next to the 0.5 chance level, final model, SHAP per head), reports
the model's own correct rate over every candidate, and writes models (CatBoost's own .cbm
format, with SHA-256 in the registry), the ids of the samples each was fit on, a report
JSON and the figures.

serve: consumes ``assignments``; Redis holds each sample's partial row (hash per sample,
head -> cluster) until every head the classifier uses has arrived (out of order and
duplicates are fine: a hash field is set once per head); complete rows are scored and a
ScoreRecord published. A row holds assignments of one cluster version and is scored only by
a classifier fit on that version; a score of a sample the classifier was fit on is marked
``in_sample`` and kept out of the rolling accuracy. Rows that stay incomplete past the TTL
are dropped and counted. Retrained classifiers are picked up from the registry without a restart.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import redis
from prometheus_client import Counter, Gauge

from apmae.classify import (
    ClassifierConfig,
    column,
    feature_frame,
    fit_task,
    model_correct_rate,
    parse_column,
)
from apmae.config import BusConfig, setting
from apmae.config import save as save_config
from apmae.messages import stable_id
from apmae.scoring import RollingScore
from apmae.topics import ASSIGNMENTS, SAMPLES, SCORES, ScoreRecord
from services.bus import Bus, DeadLetter, Message, Output, Processor, read_range
from services.registry import ArtifactStore, Registry, RegistryCache, safe_name, sha256_file

log = logging.getLogger("apmae.classifier")
SCORED = Counter("apmae_classifier_scored_total", "Samples scored", ["model", "task", "predicted"])
ACTUAL = Counter("apmae_classifier_actual_total", "Actual correctness of scored samples", ["model", "task", "actual"])
ROLLING_ACC = Gauge("apmae_classifier_rolling_accuracy", "Accuracy over the last 200 out-of-sample scored samples "
                    "(samples the classifier was not fit on)", ["model", "task"])
BRIER = Gauge("apmae_classifier_rolling_brier", "Brier score (calibration) over the last 200 out-of-sample samples",
              ["model", "task"])
IN_SAMPLE = Counter("apmae_classifier_in_sample_scores_total", "Scores of samples the classifier was fit on (not "
                    "counted in the rolling accuracy)", ["model", "task"])
EXPIRED = Counter("apmae_classifier_rows_expired_total", "Partial rows dropped incomplete (TTL, or the cap on "
                  "partial rows)", ["model", "reason"])
CV_ACC = Gauge("apmae_classifier_cv_accuracy", "Mean CV accuracy of the current classifier", ["model", "task"])


@dataclass(frozen=True)
class ClassifyConfig(BusConfig):
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)  # its settings are flags of their own name
    min_rows: int = setting(20, "Tasks with fewer balanced rows are skipped (counted)")
    cluster_version: str = setting("", "Cluster version to use (default: the most common in the topic)")
    out_dir: Path = setting(Path(""), "Report and figures directory (default: <state>/artifacts/classifier)")
    row_ttl_s: int = setting(3600, "Seconds a partial row may wait for its remaining heads")
    max_partial_rows: int = setting(100_000, "Most partial rows held in Redis; the oldest beyond it are dropped (counted)")
    group: str = setting("classifier", "Consumer group of the live scorer")

    @property
    def report_dir(self) -> Path:
        return self.out_dir if str(self.out_dir) not in ("", ".") else self.artifacts_dir / "classifier"


def gather(cfg: ClassifyConfig) -> tuple[dict, dict, str]:
    """(samples by id, {model: {sample_id: {column: cluster}}}, cluster version) from the topics."""
    bus = Bus(cfg, "classify-fit")
    samples = {m.record.id: m.record for m in read_range(bus, SAMPLES) if isinstance(m, Message)}
    by_version: dict[str, int] = defaultdict(int)
    assigns = []
    for m in read_range(bus, ASSIGNMENTS):
        if isinstance(m, Message):
            assigns.append(m.record)
            by_version[m.record.cluster_version] += 1
    if not assigns:
        return samples, {}, ""
    version = cfg.cluster_version or max(by_version, key=by_version.get)
    rows: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(dict))
    for a in assigns:
        if a.cluster_version == version:
            rows[a.model][a.sample_id][column(a.layer, a.head)] = a.cluster
    return samples, rows, version


def fit_all(cfg: ClassifyConfig) -> dict:
    """Per (target model, task): :func:`apmae.classify.fit_task` on the complete rows of one
    cluster version, the model's own correct rate over every candidate, models and figures."""
    from tqdm import tqdm

    from apmae.figures import accuracy_bars, layer_head_heatmap

    samples, rows, version = gather(cfg)
    out = cfg.report_dir
    out.mkdir(parents=True, exist_ok=True)
    store = ArtifactStore(cfg.artifacts_dir)
    registry = Registry(redis.Redis.from_url(cfg.redis_url), cfg.topic_prefix)
    ccfg = cfg.classifier
    report: dict = {"cluster_version": version, "models": {}}
    fit_files: set[str] = set()
    for model_name, per_sample in rows.items():
        columns = sorted({c for r in per_sample.values() for c in r}, key=parse_column)
        complete = {s: r for s, r in per_sample.items() if len(r) == len(columns) and s in samples}
        layers = 1 + max(parse_column(c)[0] for c in columns)
        heads = 1 + max(parse_column(c)[1] for c in columns)
        tasks: dict[str, list[str]] = defaultdict(list)
        for s in complete:
            if samples[s].correct is not None:  # noise has no label
                tasks[samples[s].task].append(s)
        # the model's accuracy per task: every labelled candidate it predicted, mined or not
        candidates: dict[str, list[bool]] = defaultdict(list)
        for r in samples.values():
            if r.model == model_name and r.correct is not None:
                candidates[r.task].append(r.correct)
        results = []
        for task, ids in tqdm(sorted(tasks.items()), desc=f"classify {model_name}", unit="task", leave=False):
            llm = model_correct_rate(candidates[task])
            row = {"task": task, "llm_correct_rate": llm["rate"], "llm_correct": llm}
            tf = fit_task(pd.Series({s: bool(samples[s].correct) for s in ids}), complete, columns, ccfg, cfg.min_rows,
                          files={s: samples[s].file_id for s in ids})  # CV folds by file
            row.update(tf.result)
            if tf.model is None:
                results.append(row)
                continue
            base = f"classifier/{version}/{safe_name(model_name)}/{task}"
            dest = store.path(f"{base}.cbm")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tf.model.save_model(str(dest))  # CatBoost's own format, not a pickle
            files = sorted({samples[s].file_id for s in tf.train_ids})
            fit_files.update(files)
            train_sha = store.write(f"{base}.train.json", json.dumps({"sample_ids": tf.train_ids,
                                                                      "file_ids": files}).encode())
            registry.put("classifier", f"{model_name}:{task}", path=f"{base}.cbm", sha256=sha256_file(dest),
                         version=version, columns=columns, cv_mean=row["mean"], train_path=f"{base}.train.json",
                         train_sha256=train_sha)
            CV_ACC.labels(model_name, task).set(row["mean"])
            layer_head_heatmap({parse_column(c): v for c, v in tf.importance.items()}, layers, heads,
                               f"{task}: max difference of mean SHAP per cluster", out / f"shap-{task}.png", "SHAP")
            row["fit_files"] = len(files)
            results.append(row)
        fitted = [r for r in results if "mean" in r]
        if fitted:
            accuracy_bars(fitted, out / f"accuracy-{safe_name(model_name)}.png",
                          f"{model_name}: LLM correctness vs classifier accuracy")
        report["models"][model_name] = {"heads": len(columns), "rows": len(complete), "tasks": results}
    # every file any classifier was fit on: live accuracy is measured on other files only
    report["fit_file_ids"] = sorted(fit_files)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    save_config(cfg, out / "config.json")
    return report


class Scorer:
    """Live scoring: partial rows in Redis until complete, then P(correct) per sample."""

    def __init__(self, cfg: ClassifyConfig):
        self.cfg = cfg
        self.bus = Bus(cfg, "classifier")
        self.redis = redis.Redis.from_url(cfg.redis_url)
        self.store = ArtifactStore(cfg.artifacts_dir)
        self.registry = Registry(self.redis, cfg.topic_prefix)
        self.models = RegistryCache(self.registry, "classifier", self.load_classifier)
        self.recent: dict[tuple[str, str], RollingScore] = defaultdict(RollingScore)
        self.pfx = f"apmae:row:{cfg.topic_prefix}"
        self.scored: list[str] = []  # rows scored in the current batch, finalized after the flush

    def load_classifier(self, entry: dict[str, str]):
        """(CatBoost model, its feature columns, the sample ids it was fit on), parsed once per load."""
        from catboost import CatBoostClassifier

        self.registry.verify("classifier", None, self.store, entry)  # checksum before loading
        clf = CatBoostClassifier()
        clf.load_model(str(self.store.path(entry["path"])))
        fit_ids: frozenset[str] = frozenset()
        if "train_path" in entry:
            fit_ids = frozenset(json.loads(self.store.read(entry["train_path"], entry["train_sha256"]))["sample_ids"])
        return clf, json.loads(entry["columns"]), fit_ids

    def classifier(self, model: str, task: str):
        """(sha256, CatBoost model, feature columns, cluster version, fit sample ids) of the
        current classifier, or None."""
        found = self.models.get(f"{model}:{task}")
        if found is None:
            return None
        entry, (clf, columns, fit_ids) = found
        return entry["sha256"], clf, columns, entry["version"], fit_ids

    def sweep(self) -> None:
        """Drop partial rows past the TTL, then the oldest beyond ``max_partial_rows``: the
        queue of incomplete rows is bounded whatever the assignment stream does."""
        index = f"{self.pfx}index"
        cutoff = time.time() - self.cfg.row_ttl_s
        expired = [(m, "ttl") for m in self.redis.zrangebyscore(index, 0, cutoff)]
        excess = self.redis.zcard(index) - len(expired) - self.cfg.max_partial_rows
        if excess > 0:
            expired += [(m, "queue full") for m in self.redis.zrange(index, len(expired), len(expired) + excess - 1)]
        for member, reason in expired:
            self.redis.delete(f"{self.pfx}{member.decode()}")
            self.redis.zrem(index, member)
            EXPIRED.labels(member.decode().split("|")[0], reason).inc()

    def handle(self, msgs: list[Message]) -> list[Output | DeadLetter]:
        """Merge a batch of assignments into the partial rows; score the rows it completes.

        Redis work is batched per distinct row (one pipeline for the "already scored?"
        checks, one for the writes, one for the reads), and each classifier scores all its
        completed rows in one call: a batch holds a few rows' worth of 720-1920 assignments.
        """
        rows: dict[str, dict[str, int]] = defaultdict(dict)
        meta: dict[str, tuple[str, str, str, bool | None, str]] = {}
        for m in msgs:
            a = m.record
            # one row per cluster version: assignments of different versions (a refit head, a
            # new plan) are different feature spaces and never share a row
            member = f"{a.model}|{a.cluster_version}|{a.sample_id}"
            rows[member][column(a.layer, a.head)] = a.cluster
            meta[member] = (a.model, a.task, a.sample_id, a.correct, a.cluster_version)
        members = list(rows)
        pipe = self.redis.pipeline(transaction=False)
        for member in members:
            pipe.exists(f"{self.pfx}scored:{member}")
        scored = dict(zip(members, pipe.execute(), strict=True))
        members = [mb for mb in members if not scored[mb]]  # late duplicates of scored rows are dropped
        pipe = self.redis.pipeline(transaction=False)
        for member in members:
            pipe.hset(f"{self.pfx}{member}", mapping=rows[member])
            pipe.zadd(f"{self.pfx}index", {member: time.time()}, nx=True)
            pipe.hgetall(f"{self.pfx}{member}")
        merged = pipe.execute()[2::3]
        # one classifier per (model, task) for the whole batch: completeness is checked against
        # the same columns the rows are then scored with, even if a retrained one lands meanwhile
        current = {(meta[mb][0], meta[mb][1]): None for mb in members}
        for key in current:
            found = self.classifier(*key)
            current[key] = None if found is None else (*found, frozenset(found[2]))  # + the column set
        ready: dict[tuple[str, str], list[tuple[str, dict[str, int]]]] = defaultdict(list)
        for member, row in zip(members, merged, strict=True):
            key = meta[member][:2]
            if current[key] is None:
                continue
            if current[key][3] != meta[member][4]:
                continue  # the classifier was fit on another cluster version: not its features
            row = {k.decode(): int(v) for k, v in row.items()}
            if current[key][5] <= row.keys():  # else: wait for the remaining heads
                ready[key].append((member, row))
        out: list[Output | DeadLetter] = []
        finished: list[str] = []
        for (model, task), done in ready.items():
            sha, clf, columns, version, fit_ids, _ = current[(model, task)]
            x = feature_frame({meta[mb][2]: row for mb, row in done}, columns)
            probs = clf.predict_proba(x)[:, 1]
            for (member, _), p in zip(done, probs, strict=True):
                _, _, sample_id, actual, _ = meta[member]
                p = float(p)
                in_sample = sample_id in fit_ids
                out.append(Output(SCORES, ScoreRecord(id=stable_id("score", member, sha), sample_id=sample_id,
                                                      model=model, task=task, prob_correct=p, actual=actual,
                                                      classifier_version=sha[:12], cluster_version=version,
                                                      in_sample=in_sample), key=sample_id))
                finished.append(member)
                self.observe(model, task, p, actual, in_sample)
        self.sweep()
        self.scored.extend(finished)  # only when the whole batch succeeded (a raise retries it per message)
        return out

    def begin_batch(self) -> None:
        """Before a batch: forget rows a failed batch scored. Their scores were never flushed,
        so the retry must score them again; marked by the next batch's flush, their
        redelivered assignments were dropped as "already scored" (lost)."""
        self.scored = []

    def finalize(self) -> None:
        """After the batch's scores are flushed: mark their rows scored and drop them. Doing it
        before the flush would lose a score when the process dies in between (the redelivered
        assignments would find the row already marked)."""
        if not self.scored:
            return
        pipe = self.redis.pipeline(transaction=False)
        for member in self.scored:
            pipe.set(f"{self.pfx}scored:{member}", 1, ex=7 * 24 * 3600)
            pipe.delete(f"{self.pfx}{member}")
            pipe.zrem(f"{self.pfx}index", member)
        pipe.execute()
        self.scored = []

    def observe(self, model: str, task: str, p: float, actual: bool | None, in_sample: bool = False) -> None:
        """Metrics of one score; the rolling accuracy counts out-of-sample scores only
        (:meth:`apmae.scoring.RollingScore.observe`)."""
        SCORED.labels(model, task, str(p >= 0.5).lower()).inc()
        if actual is not None:
            ACTUAL.labels(model, task, str(actual).lower()).inc()
        if in_sample:
            IN_SAMPLE.labels(model, task).inc()
        rolling = self.recent[(model, task)].observe(p, actual, in_sample)
        if rolling is not None:
            ROLLING_ACC.labels(model, task).set(rolling["accuracy"])
            BRIER.labels(model, task).set(rolling["brier"])

    def processor(self) -> Processor:
        self.bus.ensure_topics([ASSIGNMENTS, SCORES])
        # No per-message done marks: merging a row is idempotent (a hash field per head) and
        # the "scored" mark drops assignments of rows already scored; marking 720-1920
        # messages per row cost a fifth of the scorer's time.
        return Processor(self.bus, self.cfg.group, [ASSIGNMENTS], self.handle, batch_size=2048,
                         on_flushed=self.finalize, on_batch_start=self.begin_batch)
