"""Per-head clustering as a Kafka job queue, and live assignment of new embeddings.

``apmae cluster plan``: replays a window of the ``embeddings`` topic (from an offset or a
time, optionally one checkpoint's embeddings only), writes each head's matrix to the
artifact store, and publishes one FitJobRecord per head on ``cluster.jobs``.

``apmae cluster worker [--processes N]``: N processes in the ``cluster-fit`` consumer group
(one per core on this machine; more machines just start more workers: Kafka spreads the
job partitions). Each job fits UMAP + HDBSCAN for one head, stores the pickled model with its
SHA-256 in the registry, and publishes the batch labels of the fitted points as assignments.
Jobs are committed only after that; the done marks make a re-delivered job (its worker
died after finishing) a no-op, so every head is fitted and registered once.

``apmae assign``: consumes ``embeddings``, assigns each to its head's fitted clusters
(river-style predict), publishes AssignmentRecords, tracks per-head noise rate and drift
(ADWIN), and on drift publishes a refit job for that head only.
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import redis
from kafka import ConsumerRebalanceListener
from prometheus_client import Counter, Gauge

from apmae.cluster import (
    ClusterConfig,
    DriftMonitor,
    HeadModel,
    embedding_vector,
    fit_head,
    plan_heads,
    same_space,
)
from apmae.config import BusConfig, setting
from apmae.config import to_dict as config_to_dict
from apmae.messages import stable_id
from apmae.topics import ASSIGNMENTS, EMBEDDINGS, FIT_JOBS, AssignmentRecord, FitJobRecord, head_key
from services.bus import (
    Bus,
    DeadLetter,
    DoneStore,
    Message,
    Output,
    Processor,
    RunLimits,
    read_range,
)
from services.metrics import HeadSeries
from services.registry import ArtifactStore, Registry, RegistryCache

log = logging.getLogger("apmae.cluster")
FITS = Counter("apmae_cluster_fits_total", "Heads fitted", ["model"])
FIT_SECONDS = Counter("apmae_cluster_fit_seconds_total", "Seconds spent fitting heads", ["model"])
CLUSTERS = Gauge("apmae_cluster_clusters", "Clusters in a head's fitted model", ["model", "layer", "head"])
NOISE = Gauge("apmae_cluster_noise_ratio", "Share of noise (-1) among a head's assignments", ["model", "layer", "head"])
DRIFTS = Counter("apmae_cluster_drift_total", "Drift detections (refit triggered)", ["model", "layer", "head"])
# per-head series are bounded (StarCoder2-3B has 720 heads per model): see --head-metrics
HEAD_SERIES = HeadSeries(CLUSTERS, NOISE, DRIFTS)
ASSIGNED = Counter("apmae_cluster_assignments_total", "Embeddings assigned", ["model", "result"])


@dataclass(frozen=True)
class ClusterServiceConfig(BusConfig):
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # its settings are flags of their own name
    min_points: int = setting(30, "Heads with fewer embeddings are not fitted (counted)")
    checkpoint: str = setting("", "Only embeddings made by this checkpoint tag (default: the most common)")
    from_time: str | None = setting(None, "Window start (ISO 8601 or epoch ms); default: the whole topic")
    version: str = setting("", "Cluster model version (default: derived from the window)")
    processes: int = setting(1, "Fit worker processes on this machine")
    group: str = setting("cluster-fit", "Consumer group of the fit workers")
    assign_group: str = setting("assign", "Consumer group of the assigner")
    auto_refit: bool = setting(True, "Publish a refit job when a head drifts")
    head_metrics: int = setting(100, "Heads that export per-head metric series (least recently updated dropped "
                                     "first; 0 = none)")


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def plan(cfg: ClusterServiceConfig) -> dict:
    """Snapshot a window of embeddings per head and enqueue one fit job per head
    (:func:`apmae.cluster.plan_heads`: one checkpoint's embeddings, heads with enough points)."""
    from services.replay import parse_time

    bus = Bus(cfg, "cluster-plan")
    bus.ensure_topics([EMBEDDINGS, FIT_JOBS])
    store = ArtifactStore(cfg.artifacts_dir)
    rows: dict[str, tuple] = {}
    index: list[tuple[str, str, str]] = []
    for m in read_range(bus, EMBEDDINGS, start_ms=parse_time(cfg.from_time)):
        if not isinstance(m, Message):
            continue  # undecodable rows were dead-lettered by their consumer
        r = m.record
        index.append((r.id, head_key(r.model, r.layer, r.head), r.checkpoint))
        if r.id not in rows:
            rows[r.id] = (embedding_vector(r.payload, r.dim), r.sample_id, r.task,
                          -1 if r.correct is None else int(r.correct))
    if not rows:
        return {"heads": 0, "jobs": 0, "skipped": 0}
    hp = plan_heads(index, cfg.checkpoint, cfg.min_points)
    all_heads = sorted({key for _, key, _ in index})
    version = cfg.version or stable_id("clusters", hp.checkpoint, len(rows), all_heads)[:12]
    for key, ids in hp.heads.items():
        rel = f"clusters/{version}/data/{key}.npz"
        store.write(rel, _npz(x=np.stack([rows[i][0] for i in ids]), ids=np.array(ids),
                              samples=np.array([rows[i][1] for i in ids]), tasks=np.array([rows[i][2] for i in ids]),
                              correct=np.array([rows[i][3] for i in ids])))
        model, layer, head = key.rsplit("/", 2)
        bus.send(Output(FIT_JOBS, FitJobRecord(id=stable_id("fit", version, key), model=model, layer=int(layer),
                                               head=int(head), source=rel, version=version,
                                               checkpoint=hp.checkpoint), key=key))
    bus.close()
    log.info("cluster plan %s (checkpoint %s): %d jobs, %d heads below %d points, %d embeddings of other "
             "checkpoints left out", version, hp.checkpoint, len(hp.heads), len(hp.skipped), cfg.min_points,
             hp.other_checkpoints)
    return {"version": version, "checkpoint": hp.checkpoint, "heads": len(all_heads), "jobs": len(hp.heads),
            "skipped": len(hp.skipped), "other_checkpoints": hp.other_checkpoints}


class FitWorker:
    def __init__(self, cfg: ClusterServiceConfig):
        self.cfg = cfg
        self.bus = Bus(cfg, "cluster-fit")
        self.redis = redis.Redis.from_url(cfg.redis_url)
        self.store = ArtifactStore(cfg.artifacts_dir)
        self.registry = Registry(self.redis, cfg.topic_prefix)
        self.proc: Processor | None = None
        HEAD_SERIES.limit = cfg.head_metrics

    def head_data(self, job: FitJobRecord, key: str) -> dict[str, np.ndarray]:
        """A planned snapshot from the store, or (refits) the head's embeddings read from the
        topic: only those made by the job's checkpoint (one embedding space per fit)."""
        if not job.source.startswith("topic:"):
            return dict(np.load(io.BytesIO(self.store.read(job.source))))
        rows: dict[str, list] = defaultdict(list)
        seen: set[str] = set()
        for m in read_range(self.bus, EMBEDDINGS):
            r = getattr(m, "record", None)
            if (r is None or r.id in seen or head_key(r.model, r.layer, r.head) != key
                    or not same_space(r.checkpoint, job.checkpoint)):
                continue
            seen.add(r.id)
            rows["x"].append(embedding_vector(r.payload, r.dim))
            rows["ids"].append(r.id)
            rows["samples"].append(r.sample_id)
            rows["tasks"].append(r.task)
            rows["correct"].append(-1 if r.correct is None else int(r.correct))
        return {k: np.array(v) if k != "x" else np.stack(v) for k, v in rows.items()}

    def fit(self, job: FitJobRecord) -> list[Output]:
        key = head_key(job.model, job.layer, job.head)
        data = self.head_data(job, key)
        model = fit_head(data["x"], self.cfg.cluster)
        rel = f"clusters/{job.version}/models/{key}.joblib"
        sha = self.store.write(rel, model.to_bytes())
        self.registry.put("cluster", key, path=rel, sha256=sha, version=job.version, checkpoint=job.checkpoint,
                          n=len(model.labels),
                          n_clusters=model.n_clusters, noise_rate=model.noise_rate, seconds=model.fit_seconds,
                          explained_variance=model.explained_variance, stage_seconds=model.stage_seconds,
                          mean_cosine=model.mean_cosine,
                          config=config_to_dict(model.cfg))
        FITS.labels(job.model).inc()
        FIT_SECONDS.labels(job.model).inc(model.fit_seconds)
        if HEAD_SERIES.admit(job.model, job.layer, job.head):
            CLUSTERS.labels(job.model, str(job.layer), str(job.head)).set(model.n_clusters)
            NOISE.labels(job.model, str(job.layer), str(job.head)).set(model.noise_rate)
        self.redis.incr(f"apmae:cluster:fits:{self.cfg.topic_prefix}{job.version}:{key}")
        outs = []
        for eid, sid, task, corr, lab in zip(data["ids"], data["samples"], data["tasks"], data["correct"],
                                             model.labels, strict=True):
            outs.append(Output(ASSIGNMENTS, AssignmentRecord(
                id=f"{eid}#{job.version}", sample_id=str(sid), model=job.model, task=str(task), layer=job.layer,
                head=job.head, correct=None if corr < 0 else bool(corr), cluster=int(lab), strength=1.0,
                cluster_version=job.version, checkpoint=job.checkpoint), key=key))
        return outs

    def handle(self, msgs: list[Message]) -> list[Output | DeadLetter]:
        out: list[Output | DeadLetter] = []
        for m in msgs:
            job = m.record
            out.extend(self.proc.keepalive(lambda job=job: self.fit(job)) if self.proc else self.fit(job))
        return out

    def processor(self) -> Processor:
        self.bus.ensure_topics([FIT_JOBS, ASSIGNMENTS])
        self.proc = Processor(self.bus, self.cfg.group, [FIT_JOBS], self.handle,
                              done=DoneStore(self.redis, self.cfg.topic_prefix + self.cfg.group), batch_size=1)
        return self.proc


def run_workers(cfg: ClusterServiceConfig, limits: RunLimits, jobs: int | None = None,
                service: str | None = None, on_broken: Callable[[int], None] | None = None) -> int:
    """Run ``cfg.processes`` fit workers (one per core) until ``limits``; returns jobs done
    (``limits.max_messages`` bounds each worker).

    With ``jobs`` (the plan's count), a progress bar follows the heads registered.

    ``service`` (the ``cluster worker`` command): one worker runs supervised in this process
    (:func:`services.runtime.supervise`: a stall or a client call that never returns starts
    the command again). Worker processes (``processes`` > 1) each have the watchdog, and one
    that stalls, hangs or dies ends the pool: the processes of a
    ``multiprocessing.Pool`` were replaced silently and the lost worker's result never came,
    so the caller waited forever. Then ``on_broken(heads registered meanwhile)`` (the command
    passes a restart), or, without it, ``BrokenProcessPool`` is raised here."""
    from concurrent.futures import ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    from services.runtime import supervise

    bar = tqdm(total=jobs, desc="cluster", unit="head", leave=False, disable=jobs is None)
    if cfg.processes <= 1:
        proc = FitWorker(cfg).processor()
        with bar:
            if service is not None:
                return supervise(proc, service, limits, progress=bar.update)
            return proc.run(**vars(limits), progress=bar.update)
    import multiprocessing as mp

    registry = Registry(redis.Redis.from_url(cfg.redis_url), cfg.topic_prefix)
    before = len(registry.names("cluster"))
    broken: BrokenProcessPool | None = None
    with ProcessPoolExecutor(cfg.processes, mp_context=mp.get_context("spawn")) as pool, bar:
        futures = [pool.submit(_worker_entry, cfg, limits) for _ in range(cfg.processes)]
        running = futures
        while running:
            _, running = wait(futures, timeout=2.0)
            bar.n = len(registry.names("cluster"))
            bar.refresh()
        try:
            done = sum(f.result() for f in futures)
        except BrokenProcessPool as e:  # the executor has ended every worker by now
            broken = e
    if broken is not None:
        registered = len(registry.names("cluster")) - before
        log.error("a fit worker process ended without its result (%s); %d heads registered meanwhile",
                  broken, registered)
        if on_broken is None:
            raise broken
        on_broken(registered)
        return registered
    publish_fit_metrics(cfg)  # the worker processes are gone: report their results from the registry
    return done


def publish_fit_metrics(cfg: ClusterServiceConfig) -> None:
    """Set the per-head cluster gauges (and fit counter) from the registry entries."""
    registry = Registry(redis.Redis.from_url(cfg.redis_url), cfg.topic_prefix)
    HEAD_SERIES.limit = cfg.head_metrics
    for key in registry.names("cluster"):
        e = registry.get("cluster", key)
        model, layer, head = key.rsplit("/", 2)
        FITS.labels(model).inc()
        if HEAD_SERIES.admit(model, layer, head):
            CLUSTERS.labels(model, layer, head).set(int(e["n_clusters"]))
            NOISE.labels(model, layer, head).set(float(e["noise_rate"]))


def _worker_entry(cfg: ClusterServiceConfig, limits: RunLimits) -> int:
    """One worker process of :func:`run_workers`. A stall or a hung client call ends the
    process at once (exit 75), which breaks the pool: a pool's worker cannot start itself again."""
    import os

    from services.bus import ConsumerStalled
    from services.runtime import watch

    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    proc = FitWorker(cfg).processor()

    def end() -> None:
        logging.shutdown()
        os._exit(75)

    watch(proc, "cluster-fit", end)
    try:
        return proc.run(**vars(limits))
    except ConsumerStalled:
        log.exception("fit worker stalled; ending this worker process")
        end()
        raise  # not reached


class Assigner:
    """Live assignment of new embeddings to their head's current clusters, with drift."""

    def __init__(self, cfg: ClusterServiceConfig):
        self.cfg = cfg
        self.bus = Bus(cfg, "assign")
        self.redis = redis.Redis.from_url(cfg.redis_url)
        self.store = ArtifactStore(cfg.artifacts_dir)
        self.registry = Registry(self.redis, cfg.topic_prefix)
        self.models = RegistryCache(self.registry, "cluster", version_field="version", load=lambda e: (
            HeadModel.from_bytes(self.registry.verify("cluster", None, self.store, e)[1], e["sha256"])))
        self.drift: dict[str, tuple[str, DriftMonitor]] = {}  # head -> (cluster version, its monitor)
        self.head_partition: dict[tuple[str, str, str], tuple[str, int]] = {}  # whose series this process exports
        HEAD_SERIES.limit = cfg.head_metrics
        self.proc: Processor | None = None  # set by processor(): its group membership is kept during a transform

    def model_for(self, key: str) -> tuple[str, str, HeadModel] | None:
        """(cluster version, the AP-MAE checkpoint it was fitted on, the model) of a head."""
        found = self.models.get(key)
        return None if found is None else (found[0]["version"], found[0].get("checkpoint", ""), found[1])

    def monitor(self, key: str, version: str, model: HeadModel) -> DriftMonitor:
        """The head's drift monitor for this cluster version (a new version starts a new one)."""
        if key not in self.drift or self.drift[key][0] != version:
            self.drift[key] = (version, DriftMonitor(clusters=np.unique(model.labels).tolist()))
        return self.drift[key][1]

    def handle(self, msgs: list[Message]) -> list[Output | DeadLetter]:
        out: list[Output | DeadLetter] = []
        by_head: dict[str, list[Message]] = defaultdict(list)
        for m in msgs:
            r = m.record
            by_head[head_key(r.model, r.layer, r.head)].append(m)
        for key, group in by_head.items():
            found = self.model_for(key)
            model_name = group[0].record.model
            if found is None:  # nothing to assign it to yet: kept, with its bytes, not dropped
                ASSIGNED.labels(model_name, "unfitted").inc(len(group))
                out += [DeadLetter(m, f"no cluster fit for head {key} yet") for m in group]
                continue
            version, fitted_on, model = found
            other = [m for m in group if not same_space(m.record.checkpoint, fitted_on)]
            if other:  # another checkpoint's embedding space: never assigned to these clusters
                ASSIGNED.labels(model_name, "other_checkpoint").inc(len(other))
                group = [m for m in group if same_space(m.record.checkpoint, fitted_on)]
                if not group:
                    continue
            r0 = group[0].record
            exported = HEAD_SERIES.admit(r0.model, r0.layer, r0.head)
            if exported:
                self.head_partition[(r0.model, str(r0.layer), str(r0.head))] = (group[0].topic, group[0].partition)
                DRIFTS.labels(model_name, str(r0.layer), str(r0.head))  # series at 0
            x = np.stack([embedding_vector(m.record.payload, m.record.dim) for m in group])
            labels, strengths = self.transform(model, x)
            mon = self.monitor(key, version, model)
            for m, lab, s in zip(group, labels, strengths, strict=True):
                r = m.record
                out.append(Output(ASSIGNMENTS, AssignmentRecord(
                    id=f"{r.id}#{version}", sample_id=r.sample_id, model=r.model, task=r.task, layer=r.layer,
                    head=r.head, correct=r.correct, cluster=int(lab), strength=float(s), cluster_version=version,
                    checkpoint=r.checkpoint), key=key))
                ASSIGNED.labels(r.model, "noise" if lab == -1 else "cluster").inc()
                if mon.update(int(lab)):
                    if exported:
                        DRIFTS.labels(r0.model, str(r0.layer), str(r0.head)).inc()
                    log.warning("drift in head %s (noise rate %.2f)", key, mon.noise_rate)
                    if self.cfg.auto_refit:
                        out.append(Output(FIT_JOBS, FitJobRecord(
                            id=stable_id("refit", key, version, mon.n), model=r0.model, layer=r0.layer,
                            head=r0.head, source="topic:embeddings", version=f"{version}-r{mon.n}",
                            checkpoint=fitted_on), key=key))
                        mon = DriftMonitor(clusters=np.unique(model.labels).tolist())  # one refit per detection
                        self.drift[key] = (version, mon)
            if exported:
                NOISE.labels(r0.model, str(r0.layer), str(r0.head)).set(mon.noise_rate)
        return out

    def transform(self, model: HeadModel, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The head's cluster labels and strengths for embeddings ``x`` [n, dim], keeping the
        group membership alive meanwhile: a head's first UMAP transform compiles numba code for
        longer than the poll interval, and the member was expelled in the middle of its batch."""
        if self.proc is None:
            return model.predict_many(x)
        return self.proc.keepalive(lambda: model.predict_many(x))

    def keep_heads_of(self, assigned) -> int:
        """After a rebalance: stop exporting the series of heads whose partition this member
        no longer owns (another member exports them now); returns how many were dropped.
        Checked on assignment, not on revocation: kafka-python's eager protocol revokes every
        partition before each rebalance and usually hands most of them back."""
        owned = {(tp.topic, tp.partition) for tp in assigned}
        # a copy: this runs inside a poll, and a helper thread's poll (the processor's
        # prefetch or keepalive) runs while the handler adds heads on the loop's thread
        gone = [k for k, tp in list(self.head_partition.items()) if tp not in owned]
        n = HEAD_SERIES.forget(lambda k: k not in gone)
        for k in gone:
            self.head_partition.pop(k, None)
        return n

    def processor(self) -> Processor:
        self.bus.ensure_topics([EMBEDDINGS, ASSIGNMENTS, FIT_JOBS])
        proc = Processor(self.bus, self.cfg.assign_group, [EMBEDDINGS], self.handle,
                         done=DoneStore(self.redis, self.cfg.topic_prefix + self.cfg.assign_group), batch_size=256)
        proc.consumer = self.bus.consumer(self.cfg.assign_group, [EMBEDDINGS], listener=_HeadsWatch(proc, self))
        self.proc = proc
        return proc


class _HeadsWatch(ConsumerRebalanceListener):
    """The processor's rebalance hook, plus: the series of heads on partitions this member
    lost are removed."""

    def __init__(self, proc: Processor, assigner: Assigner):
        self.proc, self.assigner = proc, assigner

    def on_partitions_revoked(self, revoked) -> None:
        pass

    def on_partitions_assigned(self, assigned) -> None:
        self.proc.on_partitions_assigned(assigned)
        self.assigner.keep_heads_of(assigned)
