"""``apmae train``: train AP-MAE from the ``patterns.train`` topic, resumable and multi-GPU.

One process (CPU or one GPU)::

    apmae train --variant small --steps 2000 --batch-size 64

Several GPUs on one machine (DDP, NCCL), or the same on CPU with gloo for testing::

    torchrun --standalone --nproc_per_node 8 -m services.trainer --variant paper --batch-size 60 --steps 150000
    torchrun --standalone --nproc_per_node 2 -m services.trainer --variant tiny --steps 20   # CPU, gloo

Rank r reads the partitions p of ``patterns.train`` with p % world_size == r (manual
assignment: deterministic, no group rebalances). Every ``checkpoint_every`` steps rank 0
writes a checkpoint: safetensors weights, optimizer state, step, RNG state and the next
offset of *every* partition (gathered from all ranks). A restart loads the latest checkpoint
and seeks each partition to its saved offset, so each pattern is trained exactly once
relative to the saved weights: nothing twice, nothing skipped. Offsets are also committed to
the ``trainer`` group (for lag dashboards), but the checkpoint is the source of truth.
Each checkpoint is published to the model registry: a Redis hash and a record on the
``checkpoints`` topic, which the encoder watches.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata
from prometheus_client import Counter, Gauge

from apmae import config as C
from apmae.config import BusConfig, nested, setting
from apmae.mae import APMAE, TRAINER_STATE, save_pretrained
from apmae.messages import stable_id
from apmae.recipe import TrainingConfig
from apmae.topics import CHECKPOINTS, PATTERNS_TRAIN, CheckpointRecord
from apmae.train import NonFiniteLoss, make_optimizer, train_step
from services.bus import Bus, ConsumerStalled, LagProbe, Output, Processor
from services.registry import sha256_file
from services.trainer_input import Batch, Prefetcher, wait_for_batch

log = logging.getLogger("apmae.trainer")
LAG_EVERY_S = 5.0  # how often the lag gauge is refreshed (a probe consumer on its own thread)
LOSS = Gauge("apmae_trainer_loss", "Last training loss", ["run"])
STEPS = Counter("apmae_trainer_steps_total", "Optimisation steps", ["run"])
PATTERNS_TRAINED = Counter("apmae_trainer_patterns_total", "Patterns trained on", ["run"])
SKIPPED = Counter("apmae_trainer_skipped_total", "Patterns of other target models passed over", ["run"])
CHECKPOINTS_WRITTEN = Counter("apmae_trainer_checkpoints_total", "Checkpoints written", ["run"])


@dataclass(frozen=True)
class TrainerConfig(BusConfig):
    train: TrainingConfig = nested(TrainingConfig())  # the recipe, set by its own flags (--steps)
    target_model: str = setting("", "Train only on this target model's patterns (the paper trains one AP-MAE per "
                                    "LLM); others are skipped, not dead-lettered (default: all)")
    prefetch_batches: int = setting(2, "Batches decoded ahead of the training step (bounded)")
    checkpoint_every: int = setting(100, "Steps between checkpoints")
    keep_checkpoints: int = setting(3, "Checkpoints kept on disk")
    name: str = setting("apmae", "Run / registry name")
    idle_timeout_s: float = setting(0.0, "Stop (with a checkpoint) after this long without data (0: never)")
    device: str = setting("", "cpu or cuda (default: cuda when available)")
    group: str = setting("trainer", "Group offsets are committed under (for lag)")

    @property
    def run_dir(self) -> Path:
        # under the topic prefix: a run of another tenant with the same name must not resume
        # this one's checkpoint and offsets
        return self.artifacts_dir / "trainer" / f"{self.topic_prefix}{self.name}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "LATEST"
    if not pointer.exists():
        return None
    path = run_dir / pointer.read_text().strip()
    return path if (path / "model.safetensors").exists() else None


class Trainer:
    def __init__(self, cfg: TrainerConfig, on_batch: Callable[[list[str]], None] | None = None):
        self.cfg = cfg
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.startswith("cuda") else "gloo"
            torch.distributed.init_process_group(backend)
            if self.device.startswith("cuda"):
                self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                torch.cuda.set_device(self.device)
        self.bus = Bus(cfg, f"trainer-{self.rank}" if self.world > 1 else "trainer")
        self.lag = LagProbe(self.bus, self.bus.service, cfg.group, LAG_EVERY_S)
        self._lag_due = 0.0  # when observe_lag next hands over offsets (run() sets the first)
        recipe = cfg.train
        torch.manual_seed(recipe.seed)
        self.model = APMAE(recipe.model_config()).to(self.device)
        # the model's buffers are constants (patch indices, the padding mask): nothing to
        # broadcast from rank 0 before every forward
        self.ddp = (torch.nn.parallel.DistributedDataParallel(self.model, broadcast_buffers=False)
                    if self.world > 1 else self.model)
        self.schedule = recipe.schedule(self.world)
        self.opt = make_optimizer(self.model, self.schedule.lr, recipe.weight_decay)
        self.step = 0
        self.offsets: dict[int, int] = {}  # partition -> low watermark: next offset not yet trained (this rank's)
        self.all_offsets: dict[int, int] = {}
        self.trained_above: dict[int, list[int]] = {}  # partition -> offsets >= watermark already trained
        self.epoch = 0  # passes completed before the current one (watermarks are per epoch)
        self.prefetch: Prefetcher | None = None
        self.gen = torch.Generator().manual_seed(recipe.seed * 1000 + self.rank)
        self.stop = threading.Event()
        self.on_batch = on_batch
        self.last_loss: float | None = None
        # the loss curve, kept in trainer_state.json as Hugging Face trainers keep theirs: at
        # most ~1000 points whatever the run's length
        self.log_history: list[dict] = []
        self.log_every = max(1, recipe.steps // 1000)
        self.resumed_from: str | None = None
        # the input's call into the Kafka client that has run this long never returns (the
        # processing loop's bound: services.bus.Processor.poll_hang_s)
        self.poll_hang_s = Processor.poll_hang_s
        self.first_step = 0
        self.resume()

    # -- checkpoints ----------------------------------------------------------------------
    def resume(self) -> None:
        ckpt = latest_checkpoint(self.cfg.run_dir)
        if ckpt is None:
            return
        from safetensors.torch import load_file

        legacy = not (ckpt / TRAINER_STATE).exists()  # before the Hugging Face layout: all in config.json
        meta = json.loads((ckpt / ("config.json" if legacy else TRAINER_STATE)).read_text())
        self.model.load_state_dict(load_file(ckpt / "model.safetensors", device=self.device))
        state = torch.load(ckpt / "optimizer.pt", map_location=self.device, weights_only=True)
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generators"][self.rank] if self.rank < len(state["generators"]) else
                           self.gen.get_state())
        self.step = meta["step"]
        self.all_offsets = {int(p): o for p, o in meta["offsets"].items()}
        self.trained_above = {int(p): v for p, v in meta.get("trained_above", {}).items()}
        by_rank = meta.get("epochs_by_rank") or []
        self.epoch = int(by_rank[self.rank] if len(by_rank) == self.world else meta.get("epoch", 0))
        self.log_history = [h for h in meta.get("log_history", []) if h["step"] <= self.step]
        self.resumed_from = str(ckpt)
        log.info("resumed %s at step %d", ckpt, self.step)

    def checkpoint(self) -> Path | None:
        gens = [self.gen.get_state()]
        if self.prefetch is not None:
            self.epoch, self.offsets, above = self.prefetch.progress.snapshot()
            self.trained_above = {**self.trained_above, **above}
            for p in self.offsets:
                if p not in above:
                    self.trained_above.pop(p, None)
        offsets, above = dict(self.offsets), {p: v for p, v in self.trained_above.items() if p in self.offsets}
        self.bus.flush()  # this rank's dead letters are in the log before LATEST moves past them
        epochs = [self.epoch]  # per rank: each reaches the end of its partitions on its own
        if self.world > 1:
            parts: list = [None] * self.world
            torch.distributed.all_gather_object(parts, (offsets, above, self.gen.get_state(), self.epoch))
            offsets = {p: o for off, _, _, _ in parts for p, o in off.items()}
            above = {p: v for _, ab, _, _ in parts for p, v in ab.items()}
            gens = [g for _, _, g, _ in parts]
            epochs = [e for _, _, _, e in parts]
        merged = {**self.all_offsets, **offsets}
        self.all_offsets = merged
        path = None
        if self.rank == 0:
            run = self.cfg.run_dir
            name = f"step-{self.step:08d}"
            tmp = run / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_pretrained(self.model, tmp, {"train": C.to_dict(self.cfg), "step": self.step, "loss": self.last_loss,
                                   "offsets": {str(p): o for p, o in sorted(merged.items())},
                                   "trained_above": {str(p): v for p, v in sorted(above.items())},
                                   "epoch": min(epochs), "epochs_by_rank": epochs,
                                   "topic": self.bus.name(PATTERNS_TRAIN),
                                   "world_size": self.world,
                                   "log_history": self.log_history})
            torch.save({"optimizer": self.opt.state_dict(), "generators": gens}, tmp / "optimizer.pt")
            path = run / name
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
            (run / "LATEST.tmp").write_text(name)
            (run / "LATEST.tmp").replace(run / "LATEST")  # atomic: a crash never leaves a torn pointer
            for old in sorted(run.glob("step-*"))[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            self.announce(path)
            CHECKPOINTS_WRITTEN.labels(self.cfg.name).inc()
        if self.world > 1:
            torch.distributed.barrier()
        self.commit_offsets()
        return path

    def announce(self, path: Path) -> None:
        """Model registry: a Redis hash and a record on the checkpoints topic."""
        digest = sha256_file(path / "model.safetensors")
        rel = str(path.relative_to(self.cfg.artifacts_dir))
        rec = CheckpointRecord(id=stable_id(self.cfg.name, self.step, digest), name=self.cfg.name, path=rel,
                               step=self.step, sha256=digest, loss=self.last_loss)
        try:
            import redis

            from services.registry import Registry

            Registry(redis.Redis.from_url(self.cfg.redis_url), self.cfg.topic_prefix).put(
                "apmae", self.cfg.name, path=rel, step=self.step, sha256=digest, loss=str(self.last_loss))
        except Exception as e:  # the checkpoint is on disk; the pointer can be re-announced
            log.error("registry update failed: %s", e)
        self.bus.send(Output(CHECKPOINTS, rec, key=self.cfg.name))
        self.bus.flush()

    def commit_offsets(self) -> None:
        if self.committer is None or not self.offsets:
            return
        try:
            self.committer.commit({TopicPartition(self.bus.name(PATTERNS_TRAIN), p): OffsetAndMetadata(o, "", -1)
                                  for p, o in self.offsets.items()})
        except Exception as e:  # informational only: the checkpoint holds the offsets
            log.warning("offset commit for lag failed: %s", e)

    # -- data -----------------------------------------------------------------------------
    committer = None  # a consumer of the trainer group used only to commit (lag dashboards)

    def open(self) -> None:
        """Assign this rank's partitions (manual: no group join) and start the prefetch thread
        at the checkpoint's watermarks, skipping what was trained above them."""
        self.bus.ensure_topics([PATTERNS_TRAIN, CHECKPOINTS])
        topic = self.bus.name(PATTERNS_TRAIN)
        consumer = self.bus.consumer(self.cfg.group)
        parts = sorted(consumer.partitions_for_topic(topic) or [])
        mine = [p for p in parts if p % self.world == self.rank]
        consumer.assign([TopicPartition(topic, p) for p in mine])
        start = {p: self.all_offsets.get(p, 0) for p in mine}
        self.offsets = dict(start)
        self.committer = self.bus.consumer(self.cfg.group)
        self.prefetch = Prefetcher(
            consumer, topic, start, {p: set(self.trained_above.get(p, ())) for p in mine},
            batch_size=self.cfg.train.batch_size, pattern_size=self.cfg.train.pattern_size,
            shuffle_window=self.cfg.train.shuffle_window, seed=self.cfg.train.seed * 1000 + self.rank,
            depth=self.cfg.prefetch_batches, target_model=self.cfg.target_model,
            epochs=self.cfg.train.epochs, epoch=self.epoch,
            max_bytes=self.cfg.max_message_bytes,
            dead_letter=lambda r, reason: self.bus.dead_letter(topic, r.partition, r.offset, r.value, reason),
            on_skipped=lambda: SKIPPED.labels(self.cfg.name).inc())

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()
        if self.committer is not None:
            self.committer.close(autocommit=False)

    def observe_lag(self) -> None:
        """Hand this rank's next offsets to the lag probe (its own thread), every 5 s, the
        first time 5 s into the run (:meth:`run` sets ``_lag_due``), as the Processor does:
        the probe starts a consumer of its own, which a run shorter than that never needs."""
        now = time.monotonic()
        if now < self._lag_due:
            return
        self._lag_due = now + LAG_EVERY_S
        if self.prefetch is not None:  # the watermarks, computed when due rather than every step
            self.offsets = self.prefetch.progress.state()[0]
        topic = self.bus.name(PATTERNS_TRAIN)
        self.lag.observe({TopicPartition(topic, p): o for p, o in self.offsets.items()})

    # -- the loop -------------------------------------------------------------------------
    def all_ready(self, ready: bool) -> bool:
        if self.world == 1:
            return ready
        flag = torch.tensor([1 if ready else 0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def run(self, max_steps: int | None = None) -> dict:
        from tqdm import tqdm

        self.open()
        self.first_step = self.step  # steps this process trained: self.step - self.first_step
        self._lag_due = time.monotonic() + LAG_EVERY_S
        t_start, trained = time.perf_counter(), 0
        steps = self.cfg.train.steps
        end = min(steps, self.step + max_steps) if max_steps else steps
        self.model.train()
        bar = tqdm(total=end, initial=self.step, desc="train", unit="step", leave=False, disable=self.rank != 0)
        batch: Batch | None = None
        try:
            while self.step < end:
                deadline = time.monotonic() + self.cfg.idle_timeout_s if self.cfg.idle_timeout_s else None
                batch = batch or wait_for_batch(self.prefetch, deadline, self.stop, self.poll_hang_s)
                if not self.all_ready(batch is not None):
                    break
                x = batch.patterns(self.device)
                lr = self.schedule.at(self.step)
                self.last_loss = train_step(self.ddp, self.opt, x, lr, self.gen)
                self.prefetch.progress.on_trained(batch.items)
                self.step += 1
                if self.step % self.log_every == 0 or self.step == end:
                    self.log_history.append({"step": self.step, "loss": self.last_loss, "lr": lr})
                trained += len(batch.items)
                if self.on_batch:
                    self.on_batch([i.id for i in batch.items])
                batch = None
                bar.update()
                bar.set_postfix(loss=f"{self.last_loss:.4f}")
                LOSS.labels(self.cfg.name).set(self.last_loss)
                STEPS.labels(self.cfg.name).inc()
                PATTERNS_TRAINED.labels(self.cfg.name).inc(len(x))
                if self.step % self.cfg.checkpoint_every == 0:
                    self.checkpoint()
                self.observe_lag()
        except ConsumerStalled:
            raise  # the process starts again (run_restarting): closing a wedged client could wait forever
        except BaseException:  # the prefetch thread and its consumer must not outlive a failed run
            self.lag.close()
            self.close()
            raise
        loop_seconds = time.perf_counter() - t_start
        bar.close()
        if self.step % self.cfg.checkpoint_every != 0:
            self.checkpoint()
        seconds = time.perf_counter() - t_start
        self.lag.close()
        self.close()
        self.bus.close()
        return {"step": self.step, "patterns": trained, "seconds": seconds, "patterns_per_s": trained / max(seconds, 1e-9),
                "loop_seconds": loop_seconds, "duplicates_dropped": self.prefetch.duplicates,
                "epoch": self.prefetch.progress.epoch + 1, "dropped_last_partial_batch": self.prefetch.dropped_last,
                "loss": self.last_loss, "resumed_from": self.resumed_from}


def run_restarting(t: Trainer, max_steps: int | None = None) -> dict:
    """``t.run`` as a service: when its input's call into the Kafka client never returns, the
    process starts itself again (:func:`services.runtime.restart_process`) and resumes from
    its last checkpoint, exactly (offsets and trained ids are in it; at most
    ``checkpoint_every`` steps are trained again). A DDP rank raises instead: torchrun restarts
    the group."""
    from services.runtime import restart_process

    try:
        return t.run(max_steps)
    except ConsumerStalled as e:
        if t.world > 1:
            raise
        log.error("%s", e)
        restart_process(t.step - t.first_step, "trainer")
        raise  # not reached: restart_process replaces the process or exits


def main(argv: list[str] | None = None) -> None:
    """Entry point for ``python -m services.trainer`` (torchrun) and ``apmae train``."""
    import click

    from services.runtime import setup_logging, tune_allocator
    from services.settings import build, config_options

    @click.command()
    @click.option("--max-steps", type=int, default=None, help="Stop after this many steps in this run")
    @config_options(TrainerConfig)
    def cmd(max_steps, **kw):
        setup_logging()
        tune_allocator()  # torchrun starts this entry point, not the CLI's
        cfg = build(TrainerConfig, kw)
        t = Trainer(cfg)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: t.stop.set())
        if t.rank == 0:
            from services.runtime import start_service

            start_service(cfg, "trainer")
        try:
            out = run_restarting(t, max_steps)
        except NonFiniteLoss as e:
            raise SystemExit(f"training stopped: {e}") from None
        if t.rank == 0:
            click.echo(json.dumps(out))
        if t.world > 1:
            torch.distributed.destroy_process_group()

    cmd.main(args=argv, prog_name="apmae train", standalone_mode=True)


if __name__ == "__main__":
    main()
