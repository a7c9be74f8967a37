"""``apmae produce``: files in, predictions and attention patterns out (paper section 4, 5.1).

For each file record: mine the tasks (tree-sitter), build exact 256-token inputs, run the
target model in batches with attention capture, label each prediction, and publish

* ``samples``: one SampleRecord per prediction (task, target, prediction, correct, ...);
* ``patterns.train``: for correct random-task predictions of AP-MAE's training split, a fresh
  random 25% of the heads of every layer (AP-MAE training data);
* ``patterns.mine``: for every task, samples outside that split (:mod:`apmae.split`: a
  sample that trains AP-MAE is never mined), all heads (or the configured subset), balanced between
  correct and incorrect per task by a Redis-backed admission set (idempotent on retries),
  up to ``mine_per_task`` samples per task and model.

One replica per GPU, in one consumer group on ``files``. Ids are deterministic (model, file,
task, span), so a re-delivered file produces the same ids and downstream drops duplicates.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis
import torch
from prometheus_client import Counter

from apmae.codec import bf16_bits, encode_many, pack_lower
from apmae.config import BusConfig, nested, setting
from apmae.inputs import InputBuilder, ModelInput, Rejected, Sentinels
from apmae.messages import stable_id
from apmae.mining import MiningConfig
from apmae.split import Split, heads_to_capture, route, training_heads, trains_apmae
from apmae.target import LOCAL_DEFAULT, BatchResult, TargetModel, default_prompt_mode, is_correct
from apmae.tasks import mine_spans, sample_spans
from apmae.topics import (
    DEADLETTER,
    FILES,
    PATTERNS_MINE,
    PATTERNS_TRAIN,
    SAMPLES,
    DeadLetterRecord,
    PatternRecord,
    SampleRecord,
    head_key,
)
from services import metrics
from services.bus import Bus, DeadLetter, DoneStore, Message, Output, Processor, failpoints

log = logging.getLogger("apmae.producer")

PREDICTIONS = Counter("apmae_producer_predictions_total", "Predictions of the target model",
                      ["model", "task", "result"])
PATTERNS = Counter("apmae_producer_patterns_total", "Attention patterns published", ["model", "kind"])
REJECTED = Counter("apmae_producer_rejected_inputs_total", "Inputs not built", ["task", "reason"])
SECONDS = Counter("apmae_producer_seconds_total", "Producer time by stage", ["stage"])

ADMIT_LUA = """
-- KEYS: admitted-set of this label, admitted-set of the other label; ARGV: id, cap, slack
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
local mine = redis.call('SCARD', KEYS[1])
local other = redis.call('SCARD', KEYS[2])
if mine >= tonumber(ARGV[2]) then return 0 end
if KEYS[1] ~= KEYS[2] and mine > other + tonumber(ARGV[3]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class ProducerConfig(BusConfig):
    model: str = setting(LOCAL_DEFAULT, "Target model: local:smollm2, a local directory or a hub id")
    revision: str = setting("", "Model revision (hub models)")
    prompt_mode: str = setting("", "fim or prefix (default: fim when the tokenizer has FIM sentinels)")
    fim_prefix: str = setting("<fim_prefix>", "FIM prefix sentinel token")
    fim_suffix: str = setting("<fim_suffix>", "FIM suffix sentinel token")
    fim_middle: str = setting("<fim_middle>", "FIM middle sentinel token")
    device: str = setting("", "cpu or cuda[:n] (default: cuda when available)")
    dtype: str = setting("", "Model dtype (default: bfloat16 on GPU, float32 on CPU)")
    length: int = setting(256, "Tokens per input (the paper fixes 256)")
    batch_size: int = setting(8, "Inputs per forward pass")
    pipeline_depth: int = setting(1, "Forward chunks whose patterns may wait to be published while the next runs")
    files_per_batch: int = setting(2, "Files consumed per processing turn")
    mining: MiningConfig = nested(MiningConfig())  # what is mined and how much, set by its own flags
    generate_span: bool = setting(False, "Also greedy-generate the whole span (records exact_match)")
    include_plain_assign: bool = setting(False, "Count plain '=' as an assignment operator")
    pattern_dtype: str = setting("bfloat16", "Wire dtype of patterns: bfloat16 or float32")
    seed: int = setting(0, "Seed for span sampling, random spans, noise and head subsampling")
    group: str = setting("producer", "Consumer group on the files topic")

    @property
    def model_cache(self) -> Path:
        return self.state_dir / "models"

    @property
    def split(self) -> Split:
        return self.mining.split

    def input_builder(self, tokenizer) -> InputBuilder:
        """The 256-token input builder for this target model's tokenizer (fim when it has the sentinels)."""
        return InputBuilder(tokenizer, self.prompt_mode or default_prompt_mode(tokenizer), self.length,
                            Sentinels(self.fim_prefix, self.fim_suffix, self.fim_middle))


def parse_ranges(spec: str, n: int) -> list[int]:
    """'0,4,8-10' -> [0, 4, 8, 9, 10]; '' -> all of range(n). Out-of-range ids are an error."""
    if not spec:
        return list(range(n))
    out: set[int] = set()
    for part in spec.split(","):
        a, _, b = part.strip().partition("-")
        out.update(range(int(a), int(b or a) + 1))
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ValueError(f"ids {sorted(bad)} out of range 0..{n - 1} in {spec!r}")
    return sorted(out)


@dataclass
class Job:
    """One model input and where it came from."""

    sample_id: str
    file_id: str
    x: ModelInput


class Producer:
    def __init__(self, cfg: ProducerConfig, model: TargetModel | None = None, redis_client=None):
        self.cfg = cfg
        self.bus = Bus(cfg, "producer")
        self.lm = model or TargetModel.load(cfg.model, cfg.model_cache, cfg.device or None, cfg.dtype or None,
                                            cfg.revision or None)
        self.builder = cfg.input_builder(self.lm.tok)
        self.mode = self.builder.mode
        self.redis = redis_client or redis.Redis.from_url(cfg.redis_url)
        self.admit_script = self.redis.register_script(ADMIT_LUA)
        self.mine_layers = parse_ranges(cfg.mining.mine_layers, self.lm.n_layers)
        self.mine_heads = parse_ranges(cfg.mining.mine_heads, self.lm.n_heads)
        self.processor: Processor | None = None
        self.files_seen = 0
        self._publisher: ThreadPoolExecutor | None = None  # started on first use; close() stops it

    # -- inputs ---------------------------------------------------------------------------
    def jobs_for(self, msg: Message) -> list[Job]:
        f = msg.record
        jobs: list[Job] = []
        tf = self.builder.tokenize(f.content)
        res = mine_spans(f.content.encode("utf-8"), include_plain_assign=self.cfg.include_plain_assign)
        for span in sample_spans(res, self.cfg.mining.spans_per_task, f"{self.cfg.seed}:{f.id}"):
            x = self.builder.build(tf, span)
            if isinstance(x, Rejected):
                REJECTED.labels(x.task, x.reason).inc()
                continue
            jobs.append(Job(stable_id(self.lm.name, f.id, x.task, x.char_start, x.char_end), f.id, x))
        rng = random.Random(f"{self.cfg.seed}:{f.id}:random")
        for k in range(self.cfg.mining.random_per_file):
            x = self.builder.random_span(tf, rng)
            if isinstance(x, Rejected):
                REJECTED.labels(x.task, x.reason).inc()
                continue
            jobs.append(Job(stable_id(self.lm.name, f.id, "random", k, self.cfg.seed), f.id, x))
        noise_every = self.cfg.mining.noise_every
        if noise_every and int(f.id[:8], 16) % noise_every == 0:  # deterministic 1-in-N files
            x = self.builder.noise(random.Random(f"{self.cfg.seed}:{f.id}:noise"))
            jobs.append(Job(stable_id(self.lm.name, f.id, "noise", self.cfg.seed), f.id, x))
        return jobs

    # -- balancing ------------------------------------------------------------------------
    def _set(self, task: str, label: bool | None) -> str:
        name = {True: "correct", False: "incorrect", None: "unlabelled"}[label]
        return f"apmae:mine:{self.cfg.topic_prefix}{self.lm.name}:{task}:{name}"

    def admit(self, sample_id: str, task: str, label: bool | None) -> bool:
        """Admit this sample's patterns to the mining topic? Balanced per task, capped, idempotent."""
        cap = self.cfg.mining.mine_per_task if label is None else self.cfg.mining.mine_per_task // 2
        other = self._set(task, None if label is None else not label)
        return bool(self.admit_script(keys=[self._set(task, label), other],
                                      args=[sample_id, cap, self.cfg.mining.balance_slack]))

    def task_full(self, task: str) -> bool:
        if task == "noise":
            return self.redis.scard(self._set(task, None)) >= self.cfg.mining.mine_per_task
        half = self.cfg.mining.mine_per_task // 2
        return all(self.redis.scard(self._set(task, lab)) >= half for lab in (True, False))

    # -- the processing turn --------------------------------------------------------------
    def heads_to_capture(self, jobs: list[Job], full: dict[str, bool], gen: torch.Generator) -> dict[int, torch.Tensor]:
        """layer -> (B, k) heads to capture (:func:`apmae.split.heads_to_capture`)."""
        split = self.cfg.split
        train = [trains_apmae(j.x.task, j.sample_id, j.file_id, split) for j in jobs]
        mine = [not t and not full[j.x.task] for t, j in zip(train, jobs, strict=True)]
        return heads_to_capture(train, mine, self.lm.n_layers, self.lm.n_heads, split, gen)

    def outputs_for(self, jobs: list[Job], res: BatchResult) -> list[Output]:
        """One chunk's samples and patterns, encoded (the publisher thread). A CPU forward's
        patterns are read as numpy views: no torch op here, so this thread never gets an
        OpenMP team of its own (beside one, the forward ran at ~0.8x: benchmarks/omp_threads.py)."""
        outs: list[Output] = []
        name = self.lm.name
        t0 = time.perf_counter()
        patterns = {layer: p.numpy() if p.device.type == "cpu" else p for layer, p in res.patterns.items()}
        for i, job in enumerate(jobs):
            x, pred = job.x, int(res.predicted[i])
            correct = is_correct(pred, x)
            exact = None
            generated = None
            if res.generated is not None and x.target_token is not None:
                exact = tuple(res.generated[i]) == tuple(x.span_ids)
                generated = self.lm.tok.decode(list(res.generated[i]))
            outs.append(Output(SAMPLES, SampleRecord(
                id=job.sample_id, file_id=job.file_id, model=name, task=x.task, prompt_mode=self.mode,
                target=x.target_text, target_token=x.target_token if x.target_token is not None else -1,
                predicted_token=pred, predicted=self.lm.tok.decode([pred]), correct=correct,
                n_layers=self.lm.n_layers, n_heads=self.lm.n_heads, exact_match=exact, generated=generated)))
            PREDICTIONS.labels(name, x.task, {True: "correct", False: "incorrect", None: "unlabelled"}[correct]).inc()
            if not res.patterns:
                continue
            captured_all = next(iter(res.heads.values())).shape[1] == self.lm.n_heads
            to = route(x.task, correct, job.sample_id, job.file_id, self.cfg.split)  # train xor mine, by sample
            if to.train:
                gen = torch.Generator().manual_seed(int(job.sample_id[:12], 16))
                for layer in range(self.lm.n_layers):
                    if captured_all:
                        heads = training_heads(self.lm.n_heads, self.cfg.split, gen).tolist()
                        probs = patterns[layer][i, heads]
                    else:
                        heads, probs = res.heads[layer][i].tolist(), patterns[layer][i]
                    outs += self._patterns(PATTERNS_TRAIN, "train", job, x, correct, layer, heads, probs)
            if to.mine and captured_all and self.admit(job.sample_id, x.task, correct):
                for layer in self.mine_layers:
                    probs = patterns[layer][i, self.mine_heads]
                    outs += self._patterns(PATTERNS_MINE, "mine", job, x, correct, layer, self.mine_heads, probs)
        SECONDS.labels("encode").inc(time.perf_counter() - t0)
        return outs

    def _patterns(self, topic, kind: str, job: Job, x: ModelInput, correct, layer: int, heads: list[int],
                  probs: torch.Tensor | np.ndarray) -> list[Output]:
        """probs: (len(heads), T, T), a CUDA tensor or a host array."""
        payloads, reasons = encode_many(probs, self.cfg.pattern_dtype)
        outs = []
        for j, (h, payload, reason) in enumerate(zip(heads, payloads, reasons, strict=True)):
            pid = f"{job.sample_id}:{kind[0]}:{layer}:{h}"
            if payload is None:  # NaN/Inf: never enters the pipeline, kept as a dead letter
                outs.append(self._dead_pattern(topic, pid, probs[j], reason))
                continue
            rec = PatternRecord(id=pid, sample_id=job.sample_id, model=self.lm.name, task=x.task, layer=layer,
                                head=h, correct=correct, size=self.cfg.length, dtype=self.cfg.pattern_dtype,
                                payload=payload)
            outs.append(Output(topic, rec, key=head_key(self.lm.name, layer, h)))
            PATTERNS.labels(self.lm.name, kind).inc()
        return outs

    def _dead_pattern(self, topic, pid: str, probs: torch.Tensor | np.ndarray, reason: str) -> Output:
        """The dead letter of one non-finite head: its own id (from the pattern id, so a retry
        repeats it rather than adding one), small (that head's lower triangle as bfloat16,
        NaN/Inf kept: 64 KiB at 256 tokens, where the whole layer was over the size limit).
        Published with the batch's outputs, so it is flushed before the input is committed."""
        host = probs.float().cpu().numpy() if isinstance(probs, torch.Tensor) else probs  # one head: a small copy
        payload = bf16_bits(pack_lower(host)).tobytes()
        metrics.DEADLETTERS.labels(self.bus.service, topic.name).inc()
        log.warning("dead letter for pattern %s: %s", pid, reason)
        rec = DeadLetterRecord(id=stable_id("dlq", pid), source_topic=self.bus.name(topic), partition=-1, offset=-1,
                               service=self.bus.service, reason=f"{pid}: {reason}", payload=payload)
        return Output(DEADLETTER, rec, key=self.bus.name(topic))

    def handle(self, msgs: list[Message]) -> list[Output | DeadLetter]:
        """Forward the batch's inputs chunk by chunk, publishing chunk k while chunk k+1 runs.

        The model forward is the work that matters; encoding patterns and handing them to the
        Kafka client run on one publisher thread behind a hand-off of ``pipeline_depth``
        chunks (bounded memory: a chunk's captured patterns are ~18 MB per mined sample at
        256 tokens). Everything sent here is covered by the processor's flush, which comes
        before the done marks and the commit, so the at-least-once order holds.
        """
        out: list[Output | DeadLetter] = []
        jobs: list[Job] = []
        for m in msgs:
            try:
                jobs.extend(self.jobs_for(m))
            except Exception as e:  # a file that breaks the tokenizer or parser: dead letter, go on
                out.append(DeadLetter(m, f"could not build inputs: {type(e).__name__}: {e}"))
            self.files_seen += 1
        full = {t: self.task_full(t) for t in {j.x.task for j in jobs}}
        if not self.cfg.mining.forward_full_tasks:
            # a full task's candidate that trains nothing would only add a prediction; a study
            # spends that forward on the tasks still short of samples. The predictions kept are
            # those of the files before the quota filled: the correct rate over them estimates
            # the model's (consistently; the stop depends on the counts, so not exactly unbiased).
            split, kept = self.cfg.split, []
            for j in jobs:
                if full[j.x.task] and not trains_apmae(j.x.task, j.sample_id, j.file_id, split):
                    REJECTED.labels(j.x.task, "task_full").inc()
                else:
                    kept.append(j)
            jobs = kept
        gen = torch.Generator().manual_seed(self.cfg.seed)
        pending: deque[Future] = deque()
        try:
            for k in range(0, len(jobs), self.cfg.batch_size):
                chunk = jobs[k:k + self.cfg.batch_size]
                heads = self.heads_to_capture(chunk, full, gen)
                cap0 = self.lm.capture.seconds

                def forward(chunk=chunk, heads=heads):
                    return self.lm.run([j.x for j in chunk], heads, generate_span=self.cfg.generate_span)

                # one forward of a CPU batch can outlast max_poll_interval: keep the membership alive
                res = self.processor.keepalive(forward) if self.processor is not None else forward()
                cap_s = self.lm.capture.seconds - cap0
                SECONDS.labels("capture").inc(cap_s)
                SECONDS.labels("model").inc(res.model_s - cap_s)
                # the encoding runs beside the next forward (on a GPU, the device-to-host copies too)
                pending.append(self.publisher().submit(self.publish, chunk, res))
                t_wait = time.perf_counter()
                while len(pending) > self.cfg.pipeline_depth:  # back-pressure: the publisher is behind
                    self._wait(pending.popleft())
                SECONDS.labels("wait").inc(time.perf_counter() - t_wait)
            while pending:
                self._wait(pending.popleft())  # re-raises the publisher's error here
        finally:
            for f in pending:  # an error upstream: do not leave a publish running past this batch
                f.cancel()
            for f in pending:
                if not f.cancelled():
                    f.exception()
        return out

    def _wait(self, f: Future) -> None:
        """Wait for a publish while keeping the group membership alive: a wait longer than
        max_poll_interval (a slow broker) would otherwise make the group rebalance."""
        while True:
            try:
                return f.result(timeout=1.0)
            except FutureTimeout:
                if self.processor is not None:
                    self.processor.heartbeat()

    def publish(self, chunk: list[Job], res: BatchResult) -> None:
        """Encode one chunk's samples and patterns and queue them on the bus (publisher thread)."""
        self.send_all(self.outputs_for(chunk, res))

    def send_all(self, outs: list[Output]) -> None:
        """Queue one chunk's outputs on the bus (publisher thread)."""
        t0 = time.perf_counter()
        for o in outs:
            self.bus.send(o)
        SECONDS.labels("publish").inc(time.perf_counter() - t0)
        # the producer publishes from its handler, chunk by chunk: a batch is partly durable here
        failpoints.hit("mid-publish", before=self.bus.flush)

    def publisher(self) -> ThreadPoolExecutor:
        """The one publisher thread (started on first use, again after :meth:`close`)."""
        if self._publisher is None:
            self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish")
        return self._publisher

    def close(self, quietly: bool = False) -> None:
        """Let the publisher thread finish what it holds and stop, then flush and close the
        bus's Kafka producers (raising Retryable if a send was lost, as ``Bus.close``). For a
        process that goes on after producing (the demo's and the study's stages, a benchmark's
        rounds): without it the publisher thread and the client's IO thread and buffers stay
        until the garbage collector breaks this object's cycle with its processor, at a time
        of its choosing. ``quietly``: closing after an error, whose own exception is the one
        to see; a failed flush or close is logged, not raised (the batch it belonged to was
        not committed and is read again). The producer may be used again after it: both the
        thread and the clients start again on demand."""
        pool, self._publisher = self._publisher, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        try:
            self.bus.close()
        except Exception as e:
            if not quietly:
                raise
            log.warning("closing the producer's bus after an error failed too: %s: %s", type(e).__name__, e)

    def processor_for(self, done: DoneStore | None = None) -> Processor:
        self.bus.ensure_topics([FILES, SAMPLES, PATTERNS_TRAIN, PATTERNS_MINE])
        self.processor = Processor(self.bus, self.cfg.group, [FILES], self.handle,
                                   done=done or DoneStore(self.redis, self.cfg.topic_prefix + self.cfg.group),
                                   batch_size=self.cfg.files_per_batch)
        return self.processor
