"""Fault injection on the real services, as processes, against the real broker and Redis.

Each test starts a service with the CLI (``python -m services.cli ...``), waits until it
is part-way through its input, injects one fault (SIGKILL mid-batch, a Redis restart, a
second consumer joining the group, poison and oversize input), lets the service (or its
restart) finish, and then accounts for every input by id: exactly one distinct output or
one dead letter, never both, none lost. A dead letter is matched to its input by the source
topic/partition/offset it carries (or, failing that, by the id of the original record in
its payload), so poison that has no id of its own is accounted for too.

Raw duplicates in the output topic (at-least-once delivery: a batch partly flushed before a
kill is re-run after it) are counted and asserted against what the design allows, at most
the outputs of the one batch in flight; distinct ids are what downstream consumers see,
because every output id is deterministic and every consumer drops repeats by id. Counting
distinct ids (not raw messages) is what keeps these tests independent of where a kill lands.

``pytest -s`` prints one ``FAULT`` line per test: the README's table.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from apmae.classify import ClassifierConfig
from apmae.codec import encode_pattern
from apmae.messages import InvalidMessage, Record, decode
from apmae.topics import (
    ASSIGNMENTS,
    DEADLETTER,
    EMBEDDINGS,
    FILES,
    PATTERNS_MINE,
    PATTERNS_TRAIN,
    SAMPLES,
    SCORES,
    PatternRecord,
)
from services.bus import Bus, Message, Output, read_range, topic_end_offsets
from services.infra import servers
from tests.conftest import java_files
from tests.integration.test_classifier_service import assignments, sample
from tests.integration.test_trainer import SIZE, pattern

pytestmark = [pytest.mark.integration, pytest.mark.fault]
ROOT = Path(__file__).resolve().parents[2]


def env_for(bus_cfg, **extra) -> dict[str, str]:
    env = os.environ | {f"APMAE_{k.upper()}": str(v) for k, v in vars(bus_cfg).items()}
    return env | {k: str(v) for k, v in extra.items()}


def start(args: list[str], bus_cfg, module: str = "services.cli", **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], env=env_for(bus_cfg, **extra), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def communicate(proc: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    """``proc.communicate``; a service that has not ended in ``timeout`` first prints every
    thread's stack (SIGUSR1: :func:`services.runtime.start_service`), and the failure shows
    them with its own log: a hang on the CI machine is diagnosed from that run's report."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        _, err = proc.communicate()
        own = [line for line in err.splitlines() if " kafka." not in line]  # the client's retries drown the rest
        pytest.fail(f"{' '.join(proc.args[2:])} did not end in {timeout:.0f} s; its stacks and log:\n"
                    + "\n".join(own[-200:]))


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, err = communicate(proc, timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def ids(bus, topic) -> list[str]:
    return [m.record.id for m in read_range(bus, topic)]


def wait_then(proc: subprocess.Popen, done, fault, timeout: float = 300) -> None:
    """Poll ``done()`` until it is true, then run ``fault()``; the service must still be running."""
    t0 = time.monotonic()
    while not done():
        assert proc.poll() is None, f"the service finished before the fault was injected: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() - t0 < timeout, "the service made no progress"
        time.sleep(0.1)
    fault()


def sigkill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def count_so_far(bus, topic):
    """A probe: how many messages ``topic`` holds now."""
    return lambda: sum(topic_end_offsets(bus, topic).values())


Position = tuple[str, int, int]  # (physical topic, partition, offset)


def inputs_of(bus, topic, key: Callable[[Record], str] = lambda r: r.id) -> dict[Position, tuple[str, bytes]]:
    """Every message of an input topic: position -> (input id, Kafka key). A decodable message's
    id is ``key(record)``; an undecodable one (poison) has only its position as an id."""
    out = {}
    for m in read_range(bus, topic):
        pos = (m.topic, m.partition, m.offset)
        out[pos] = (key(m.record) if isinstance(m, Message) else f"{m.topic}:{m.partition}:{m.offset}", m.key or b"")
    return out


def dead_lettered(bus, where: dict[Position, tuple[str, bytes]], key: Callable[[Record], str] = lambda r: r.id,
                  ) -> tuple[list[str], list]:
    """The input ids the dead-letter topic accounts for (one entry per dead letter, repeats
    kept), and the dead letters that are not of these inputs (the producer's rejected NaN
    patterns, whose source is its output topic)."""
    ids = {v[0] for v in where.values()}
    credited, other = [], []
    for m in read_range(bus, DEADLETTER):
        assert isinstance(m, Message), f"an undecodable dead letter at {m.topic}[{m.partition}]@{m.offset}"
        r = m.record
        pos = (r.source_topic, r.partition, r.offset)
        if pos in where:
            credited.append(where[pos][0])
            continue
        try:  # positions change when a restarted broker re-creates a topic; the original's id does not
            orig = key(decode(r.payload, bus.logical(r.source_topic).record))
        except (InvalidMessage, KeyError):
            orig = None
        if orig in ids:
            credited.append(orig)
        else:
            other.append(r)
    return credited, other


def account(name: str, inputs: set[str], outputs: list[str] | list[tuple[str, str]], dead: list[str], *, fault: str,
            max_duplicates: int, expect_dead: set[str] = frozenset(), **extra) -> dict:
    """in = distinct outputs + dead letters, disjoint, none lost, nothing invented; exactly the
    expected inputs dead-lettered; raw repeats (outputs and dead letters) within the bound.
    ``outputs``: the input id of each raw output message, or (output id, input id) pairs where
    one input makes several outputs (a file, its samples). Prints the README row."""
    pairs = [(o, o) if isinstance(o, str) else o for o in outputs]
    got, dl = {i for _, i in pairs}, set(dead)
    repeats = len(pairs) - len({o for o, _ in pairs}) + len(dead) - len(dl)
    row = {"service": name, "fault": fault, "in": len(inputs), "out": len(got & inputs), "dead_lettered": len(dl),
           "raw_duplicates": repeats, "lost": len(inputs - got - dl), **extra}
    print("FAULT", json.dumps(row))
    assert row["lost"] == 0, sorted(inputs - got - dl)[:20]
    assert got <= inputs and dl <= inputs, sorted((got | dl) - inputs)[:20]  # nothing invented
    assert not got & dl, sorted(got & dl)[:20]  # an input is processed or dead-lettered, not both
    assert dl == set(expect_dead), (sorted(dl - set(expect_dead))[:20], sorted(set(expect_dead) - dl)[:20])
    assert row["raw_duplicates"] <= max_duplicates, row
    return row


# -- SIGKILL mid-batch, one service at a time ----------------------------------------------
def test_ingest_killed_mid_run_then_restarted(bus_cfg, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    files = java_files(3000, "k")
    for f in files:
        (corpus / f.path).write_text(f.content)
    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    proc = start(["ingest", "--corpus", str(corpus)], bus_cfg)
    wait_then(proc, lambda: count_so_far(bus, FILES)() >= 300, lambda: sigkill(proc))
    finish(start(["ingest", "--corpus", str(corpus)], bus_cfg))
    assert not ids(bus, DEADLETTER)  # ingest reads files, not a topic: good files are never dead letters
    # at most the one unacknowledged batch (ingest flushes every 512 files) is published again
    account("ingest", {f.id for f in files}, ids(bus, FILES), [], fault="SIGKILL", max_duplicates=512)


def test_producer_killed_mid_batch_then_restarted(bus_cfg, tiny_model_dir):
    from tests.integration.test_bus import publish

    bus = Bus(bus_cfg, "test")
    files = java_files(24, "p")
    publish(bus, files)
    args = ["produce", "--model", str(tiny_model_dir), "--mine-per-task", "100000", "--balance-slack", "100000",
            "--until-caught-up", "--idle-timeout", "30"]  # a restart first waits out the dead member's session
    proc = start(args, bus_cfg)
    wait_then(proc, lambda: count_so_far(bus, SAMPLES)() >= 40, lambda: sigkill(proc))
    finish(start(args, bus_cfg))
    samples = [m.record for m in read_range(bus, SAMPLES)]
    by_id = {s.id: s for s in samples}
    mined = [m.record for m in read_range(bus, PATTERNS_MINE)]
    where = inputs_of(bus, FILES)
    dead, other = dead_lettered(bus, where)
    assert not other, [(d.source_topic, d.reason) for d in other]  # the tiny model's patterns are finite
    # a file is the producer's unit of work: every input file produced its samples (distinct
    # file ids, so the bound on repeats is checked below, on samples and patterns)
    row = account("producer", {f.id for f in files}, sorted({s.file_id for s in samples}), dead, fault="SIGKILL",
                  max_duplicates=0, samples=len(by_id), raw_duplicate_samples=len(samples) - len(by_id),
                  mined_patterns=len({p.id for p in mined}), raw_duplicate_patterns=len(mined) - len({p.id for p in mined}))
    # every head of every layer of every sample outside AP-MAE's training split (apmae.split:
    # those are never mined) was mined, by distinct pattern id: a batch partly flushed before
    # the kill repeats some raw messages, never a missing head
    from apmae.split import trains_apmae
    from services.producer import ProducerConfig

    split = ProducerConfig(**vars(bus_cfg)).split
    to_mine = {sid for sid, s in by_id.items() if not trains_apmae(s.task, sid, s.file_id, split)}
    per_sample: dict[str, set[str]] = defaultdict(set)
    for p in mined:
        per_sample[p.sample_id].add(p.id)
    assert set(per_sample) == to_mine
    for sid in to_mine:
        s = by_id[sid]
        assert per_sample[sid] == {f"{sid}:m:{layer}:{h}" for layer in range(s.n_layers) for h in range(s.n_heads)}
    # raw repeats come from the one batch in flight at the kill: at most files_per_batch (2) files
    repeated = [sid for sid, n in Counter(s.id for s in samples).items() if n > 1]
    repeated += [sid for (_, sid), n in Counter((p.id, p.sample_id) for p in mined).items() if n > 1]
    assert len({by_id[sid].file_id for sid in repeated}) <= 2, row


def patterns(bus, n: int, tag: str = "", topics=(PATTERNS_MINE, PATTERNS_TRAIN)) -> set[str]:
    """n random causal 64 x 64 patterns on ``topics``; returns their sample ids (one each)."""
    out = set()
    for i in range(n):
        a = pattern(zlib.crc32(f"{tag}{i}".encode()))  # deterministic per (tag, i)
        rec = PatternRecord(id=f"{tag}p{i}", sample_id=f"{tag}s{i}", model="m", task="identifier", layer=i % 3,
                            head=i % 2, correct=bool(i % 2), size=SIZE, payload=encode_pattern(a))
        for t in topics:
            bus.send(Output(t, rec, key=f"m/{i % 3}/{i % 2}"))
        out.add(rec.sample_id)
    bus.flush()
    return out


def register_checkpoint(bus_cfg, redis_client, name: str) -> None:
    """A small random AP-MAE for 64 x 64 patterns, registered as ``name`` for the encoder."""
    import torch

    from apmae.mae import APMAE, save_pretrained, variant
    from services.registry import apmae_key, sha256_file

    torch.manual_seed(0)
    d = save_pretrained(APMAE(variant("small", pattern_size=64, patch_size=16)), bus_cfg.artifacts_dir / name)
    redis_client.hset(apmae_key(bus_cfg.topic_prefix, name), mapping={"path": name, "step": 1,
                                                             "sha256": sha256_file(d / "model.safetensors")})


def by_sample(r: Record) -> str:
    return r.sample_id


def account_encoder(bus, inputs: set[str], *, fault: str, max_duplicates: int, expect_dead=frozenset()) -> dict:
    embs = [m.record for m in read_range(bus, EMBEDDINGS)]
    dead, other = dead_lettered(bus, inputs_of(bus, PATTERNS_MINE, by_sample), by_sample)
    assert not other, [(d.source_topic, d.reason) for d in other]
    row = account("encoder", inputs, [e.sample_id for e in embs], dead, fault=fault, max_duplicates=max_duplicates,
                  expect_dead=expect_dead)
    assert len({e.id for e in embs}) == len(inputs) - len(expect_dead)  # one embedding id per good pattern
    return row


# One torch thread leaves the encoder a core to spare: it then fetches the next batch and
# ends the last one (publish, flush, marks, commit) beside each forward (overlap_ending).
TORCH_THREADS = {"all cores": {"OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))},
                 "a core to spare": {"OMP_NUM_THREADS": "1"}}


@pytest.mark.parametrize("threads", list(TORCH_THREADS))
def test_encoder_killed_mid_batch_then_restarted(bus_cfg, redis_client, threads):
    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    inputs = patterns(bus, 1500)
    register_checkpoint(bus_cfg, redis_client, "kill")
    args = ["encode", "--checkpoint", "kill", "--batch-size", "16", "--until-caught-up", "--idle-timeout", "30"]
    proc = start(args, bus_cfg, **TORCH_THREADS[threads])
    wait_then(proc, lambda: count_so_far(bus, EMBEDDINGS)() >= 200, lambda: sigkill(proc))
    finish(start(args, bus_cfg, **TORCH_THREADS[threads]))
    # a kill between a batch's flush and its done marks repeats that batch: at most 16 (with the
    # ending overlapped too: one batch's ending at a time, the batch beside it not yet sent)
    account_encoder(bus, inputs, fault=f"SIGKILL, {threads}", max_duplicates=16)


# -- poison and oversize input ----------------------------------------------------------------
def envelope(header: bytes, payload: bytes = b"") -> bytes:
    import struct

    return b"AP" + struct.pack(">BI", 1, len(header)) + header + payload


def poison_cases(limit: int) -> dict[str, bytes]:
    """Messages a consumer of ``patterns.mine`` must dead-letter, each for a different reason.
    Each of the first four crashed a decoder once (RecursionError, ValueError) or could."""
    def head(name: str) -> str:  # a valid pattern header; its own sample id (the fault tests' input id)
        return json.dumps({"schema": "pattern", "v": 1, "id": name, "sample_id": name, "model": "m",
                           "task": "identifier", "layer": 0, "head": 0, "correct": True, "size": SIZE,
                           "dtype": "bfloat16"})

    nan = np.full(SIZE * (SIZE + 1) // 2, np.nan, dtype="<f4").view("<u2")[1::2].tobytes()  # bf16 NaNs
    return {
        "header nested 100k deep": envelope(b'{"id":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "5000-digit int": envelope(head("d").replace('"layer": 0', '"layer": ' + "9" * 5000).encode()),
        "NaN in the header": envelope(head("n").replace('"correct": true', '"correct": NaN').encode()),
        "not an envelope": b"\x00\x01 garbage",
        "wrong schema": envelope(b'{"schema": "sample", "v": 1, "id": "y"}'),
        "NaN pattern": envelope(head("nan-pattern").encode(), nan),  # decodes; the handler rejects it
        "over the size limit": envelope(head("oversize").encode(), b"\x00" * (limit + 16 * 1024)),
    }


@pytest.mark.parametrize("threads", list(TORCH_THREADS))
def test_encoder_dead_letters_poison_and_oversize_input_and_keeps_going(bus_cfg, redis_client, threads):
    """Poison between good patterns: each is dead-lettered once (a dead letter always fits,
    whatever the input's size), every good pattern is embedded, the service never crash-loops;
    with the ending in line and overlapped alike (dead letters are sent in the ending)."""
    limit = 1 << 20  # the service's limit; the test's producer (4 MiB) can still write past it
    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    inputs = patterns(bus, 100, tag="a", topics=(PATTERNS_MINE,))
    for name, value in poison_cases(limit).items():
        bus.producer.send(bus.name(PATTERNS_MINE), key=f"poison:{name}".encode(), value=value)
    inputs |= patterns(bus, 100, tag="b", topics=(PATTERNS_MINE,))
    where = inputs_of(bus, PATTERNS_MINE, by_sample)
    poison = {i for i, k in where.values() if k.startswith(b"poison:")}
    assert len(poison) == len(poison_cases(limit)) and len(where) == len(inputs) + len(poison)
    register_checkpoint(bus_cfg, redis_client, "poison")
    out = finish(start(["encode", "--checkpoint", "poison", "--batch-size", "16", "--until-caught-up", "--idle-timeout", "10"], bus_cfg,
                       APMAE_MAX_MESSAGE_BYTES=limit, **TORCH_THREADS[threads]))
    assert json.loads(out.strip().splitlines()[-1])["service"] == "encoder"
    # one run, no restart: nothing is repeated
    account_encoder(bus, inputs | poison, fault=f"poison + oversize input, {threads}", max_duplicates=0,
                    expect_dead=poison)
    for m in read_range(bus, DEADLETTER):
        assert len(m.value) <= limit, (m.record.reason, len(m.value))


def test_trainer_killed_mid_run_resumes_from_its_checkpointed_offsets(bus_cfg):
    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    patterns(bus, 400)
    args = ["--variant", "tiny", "--pattern-size", "64", "--patch-size", "16", "--batch-size", "8", "--steps", "50",
            "--checkpoint-every", "5", "--name", "kill", "--idle-timeout-s", "10"]
    from services.trainer import TrainerConfig

    run_dir = TrainerConfig(**vars(bus_cfg), name="kill").run_dir
    proc = start(args, bus_cfg, module="services.trainer")

    def step_of_latest() -> int:
        p = run_dir / "LATEST"
        if not p.exists():
            return 0
        cfg = run_dir / p.read_text().strip() / "trainer_state.json"
        return json.loads(cfg.read_text())["step"] if cfg.exists() else 0

    wait_then(proc, lambda: step_of_latest() >= 10, lambda: sigkill(proc))
    resumed_at = step_of_latest()
    out = finish(start(args, bus_cfg, module="services.trainer"))
    result = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert result["resumed_from"].endswith(f"{resumed_at:08d}") and result["step"] == 50
    meta = json.loads((run_dir / (run_dir / "LATEST").read_text().strip() / "trainer_state.json").read_text())
    # offsets: exactly the checkpointed patterns plus the resumed run's, none twice, none skipped
    assert sum(meta["offsets"].values()) == 50 * 8
    assert result["patterns"] == (50 - resumed_at) * 8
    print("FAULT", json.dumps({"service": "trainer", "fault": "SIGKILL", "in": 400, "out": 50 * 8,
                               "resumed_at_step": resumed_at, "trained_after_resume": result["patterns"],
                               "raw_duplicates": 0, "lost": 0}))


def test_a_trainer_whose_input_call_never_returns_starts_itself_again(bus_cfg):
    """The trainer's input thread waits in kafka-python like any consumer, and a call that
    never returns used to leave training waiting for batches forever (no watchdog). Now the
    training thread sees the call outlast ``poll_hang_s`` (4 s here), the process starts
    itself again and resumes from its last checkpoint: every pattern trained once, none
    skipped. The first process's input thread hangs at its 7th poll."""
    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    patterns(bus, 400)
    args = ["--variant", "tiny", "--pattern-size", "64", "--patch-size", "16", "--batch-size", "8", "--steps", "50",
            "--checkpoint-every", "5", "--name", "hang", "--idle-timeout-s", "10"]
    code = f"""
import os, threading, time
from services.bus import Processor
Processor.poll_hang_s = 4.0  # the default the trainer takes (120 s in production)
if "APMAE_STALL_RESTARTS" not in os.environ:
    from kafka import KafkaConsumer
    real, calls = KafkaConsumer.poll, []
    def poll(self, *a, **kw):
        if threading.current_thread().name == "trainer-prefetch":
            calls.append(1)
            if len(calls) > 6:
                time.sleep(1e9)
        return real(self, *a, **kw)
    KafkaConsumer.poll = poll
from services.trainer import main
main({args!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", code], env=env_for(bus_cfg), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = communicate(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "has not returned" in err and "starting again (1 of 5)" in err, err[-3000:]
    result = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    resumed_at = int(result["resumed_from"][-8:]) if result["resumed_from"] else 0
    assert result["step"] == 50 and result["patterns"] == (50 - resumed_at) * 8
    from services.trainer import TrainerConfig

    run_dir = TrainerConfig(**vars(bus_cfg), name="hang").run_dir
    meta = json.loads((run_dir / (run_dir / "LATEST").read_text().strip() / "trainer_state.json").read_text())
    assert sum(meta["offsets"].values()) == 50 * 8  # every pattern once: none skipped, none twice


def fit_labelled(bus, bus_cfg, out_dir: Path, classifier: ClassifierConfig):
    """120 labelled samples and their assignments on the bus, and the classifier fit on them
    (the scorer reads and scores these too); returns the rng that drew them, to go on with."""
    import random

    from services.classifier import ClassifyConfig, fit_all

    rng = random.Random(0)
    for i in range(120):
        bus.send(Output(SAMPLES, sample(i, i % 2 == 0)))
        for a in assignments(i, i % 2 == 0, rng):
            bus.send(Output(ASSIGNMENTS, a))
    bus.flush()
    fit_all(ClassifyConfig(**vars(bus_cfg), classifier=classifier, out_dir=out_dir))
    return rng


def scorer_setup(bus_cfg, tmp_path, n_live: int):
    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    rng = fit_labelled(bus, bus_cfg, tmp_path / "rep", ClassifierConfig(iterations=60, depth=4, folds=3, threads=2))
    live = []
    for i in range(1000, 1000 + n_live):
        live += assignments(i, i % 2 == 0, rng)
    rng.shuffle(live)
    for a in live:
        bus.send(Output(ASSIGNMENTS, a, key=a.sample_id))
    bus.flush()
    return bus, {f"s{i}" for i in range(1000, 1000 + n_live)} | {f"s{i}" for i in range(120)}


def account_scores(bus, expected: set[str], *, fault: str, workers: int = 1) -> dict:
    """Scores by sample id; no dead letters (every assignment is valid). Repeats come from a
    batch re-run after a fault: at most one batch (2048 assignments, so at most 2048 rows
    completed) per worker that was in flight."""
    scores = [m.record.sample_id for m in read_range(bus, SCORES)]
    dead, other = dead_lettered(bus, inputs_of(bus, ASSIGNMENTS, by_sample), by_sample)
    assert not other, [(d.source_topic, d.reason) for d in other]
    return account("classifier", expected, scores, dead, fault=fault, max_duplicates=2048 * workers)


def test_classifier_killed_mid_batch_then_restarted(bus_cfg, tmp_path):
    bus, expected = scorer_setup(bus_cfg, tmp_path, 1500)
    args = ["classify", "serve", "--until-caught-up", "--idle-timeout", "10", "--threads", "1"]
    proc = start(args, bus_cfg)
    wait_then(proc, lambda: count_so_far(bus, SCORES)() >= 150, lambda: sigkill(proc))
    # the restart waits out the dead member's session before its partitions come back
    finish(start(["classify", "serve", "--until-caught-up", "--idle-timeout", "30", "--threads", "1"], bus_cfg))
    account_scores(bus, expected, fault="SIGKILL")


# -- Redis stopped and restarted ------------------------------------------------------------
def test_redis_restart_mid_run_loses_nothing(bus_cfg, tmp_path, infra_cfg):
    bus, expected = scorer_setup(bus_cfg, tmp_path, 1500)
    redis_server = next(s for s in servers(infra_cfg, ("redis",)))
    args = ["classify", "serve", "--until-caught-up", "--idle-timeout", "20", "--threads", "1"]
    proc = start(args, bus_cfg)

    def outage() -> None:
        redis_server.stop()
        time.sleep(3)  # the scorer keeps polling, fails its batches, backs off
        redis_server.start()

    wait_then(proc, lambda: count_so_far(bus, SCORES)() >= 150, outage)
    out = finish(proc)
    assert json.loads(out.strip().splitlines()[-1])["service"] == "classifier"
    # an outage is retried, never dead-lettered (account: no input is expected to be)
    account_scores(bus, expected, fault="Redis stop + restart")
    assert not ids(bus, DEADLETTER)


# -- a consumer group rebalance while messages are in flight ---------------------------------
def test_rebalance_when_a_second_worker_joins(bus_cfg, tmp_path):
    bus, expected = scorer_setup(bus_cfg, tmp_path, 1500)
    args = ["classify", "serve", "--idle-timeout", "15", "--threads", "1"]
    first = start(args, bus_cfg)
    second: list[subprocess.Popen] = []
    wait_then(first, lambda: count_so_far(bus, SCORES)() >= 150, lambda: second.append(start(args, bus_cfg)))
    finish(first)
    finish(second[0])
    account_scores(bus, expected, fault="rebalance (2nd worker joins)", workers=2)


# -- the (in-memory) broker stopped and restarted ---------------------------------------------
def test_broker_restart_is_detected_said_and_survived(bus_cfg, infra_cfg, redis_client):
    """The embedded broker forgets every topic and offset when it restarts. The encoder must
    keep running, say so (log + apmae_offsets_reset_total), and process everything published
    after the restart from its first offset: nothing after the restart is skipped."""
    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    patterns(bus, 600)
    register_checkpoint(bus_cfg, redis_client, "brk")
    proc = start(["encode", "--checkpoint", "brk", "--batch-size", "16", "--idle-timeout", "60"], bus_cfg)
    broker = next(s for s in servers(infra_cfg, ("broker",)))

    def restart() -> None:
        broker.stop()
        time.sleep(2)
        broker.start()

    wait_then(proc, lambda: count_so_far(bus, EMBEDDINGS)() >= 100, restart)
    bus = Bus(bus_cfg, "test")  # the test's own clients reconnect too
    bus.ensure_topics()
    # new work after the restart, fewer messages than the encoder had consumed
    after = patterns(bus, 200, tag="after", topics=(PATTERNS_MINE,))
    out, log = communicate(proc)
    assert proc.returncode == 0, log[-3000:]
    embs = [m.record.sample_id for m in read_range(bus, EMBEDDINGS)]
    # the topics now hold only what was published after the restart
    dead, other = dead_lettered(bus, inputs_of(bus, PATTERNS_MINE, by_sample), by_sample)
    assert not other, [(d.source_topic, d.reason) for d in other]
    account("encoder", after, [e for e in embs if e.startswith("after")], dead,
            fault="broker stop + restart (topics lost)", max_duplicates=16)  # one batch retried at most
    assert "broker restarted" in log, log[-3000:]
