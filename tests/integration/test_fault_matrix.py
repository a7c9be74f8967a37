"""The fault matrix: every consuming service x every fault, on the durable embedded broker.

Services (each a process started with the CLI, as in production): the producer (files in,
samples and patterns out), the encoder (patterns in, embeddings out), the assigner
(embeddings in, assignments out) and the scorer (assignments in, scores out). The trainer
runs its own input loop and has its own fault tests (test_faults.py, test_durable_broker.py).

Faults, each at an exact point where one exists (``services.bus.failpoints``), so that no
cell passes or fails with the timing of a kill:

* ``kill mid-publish``   SIGKILL with half of the 2nd batch's outputs flushed; restart
* ``kill flush-to-mark`` SIGKILL after the 2nd batch's flush, before its done marks; restart
* ``flush failure``      the 2nd batch's flush fails; the service retries it
* ``poison``             undecodable messages between good ones (each crashed a decoder once)
* ``oversize``           a message over the service's size limit
* ``Redis restart``      Redis stopped for 3 s and started again while the service runs
* ``broker restart``     the durable broker (and its S3 store) stopped and started mid-run

Every cell asserts: in = distinct outputs + dead letters, disjoint, nothing lost, nothing
invented, exactly the bad inputs dead-lettered, and raw repeats (at-least-once) within the
one batch in flight. ``pytest -s`` prints one ``FAULT`` line per cell: the README's table.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from apmae.classify import ClassifierConfig
from apmae.cluster import ClusterConfig
from apmae.config import BusConfig
from apmae.messages import Record
from apmae.topics import (
    ASSIGNMENTS,
    DEADLETTER,
    EMBEDDINGS,
    FILES,
    PATTERNS_MINE,
    SAMPLES,
    SCORES,
    EmbeddingRecord,
    Topic,
)
from services.bus import Bus, Output, read_range, topic_end_offsets
from services.infra import InfraConfig, down, free_port, servers, up
from tests.conftest import java_files
from tests.integration.test_classifier_service import assignments
from tests.integration.test_cluster_service import synthetic_embeddings
from tests.integration.test_faults import (
    account,
    by_sample,
    communicate,
    count_so_far,
    dead_lettered,
    envelope,
    finish,
    fit_labelled,
    inputs_of,
    patterns,
    register_checkpoint,
    start,
    wait_then,
)

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.slow]
LIMIT = 1 << 20  # the services' message limit in these tests; the test's own producer writes past it


@pytest.fixture(scope="module")
def durable(tmp_path_factory):
    """The default infrastructure, durable: Tansu on its local S3 store, and Redis."""
    cfg = InfraConfig(state_dir=tmp_path_factory.mktemp("matrix"), kafka_port=free_port(), redis_port=free_port(),
                      prometheus_port=free_port(), s3_port=free_port(), ephemeral=False)
    up(cfg, ("broker", "redis"))
    yield cfg
    down(cfg, ("broker", "redis"))


@pytest.fixture
def cfg(durable: InfraConfig, tmp_path: Path) -> BusConfig:
    return BusConfig(bootstrap_servers=durable.bootstrap_servers, redis_url=durable.redis_url, state_dir=tmp_path,
                     topic_prefix=f"x{uuid.uuid4().hex[:8]}.", group_poll_interval_ms=8000)


# -- the services -------------------------------------------------------------------------------
@dataclass
class Service:
    """How to feed one service, run it, and read back what it made of its input."""

    name: str
    input_topic: Topic
    args: list[str]
    # what the service needs before its input (a checkpoint, a fit); returns the ids of any
    # input it publishes on the way (the assigner's fitted embeddings are its input too)
    prepare: Callable[[Bus, BusConfig], set[str]]
    # publishes n good inputs, distinct per part; returns their ids (as input_key reads them)
    feed: Callable[[Bus, int, int], set[str]]
    # (output id, input id) per raw output message: repeats of an output id are raw duplicates
    outputs: Callable[[Bus, BusConfig], list[tuple[str, str]]]
    batch_bound: Callable[[Bus], int]  # raw repeats the one batch in flight may leave
    progress: tuple[Topic, int]  # the mid-run faults strike once this topic holds this many
    size: int  # inputs for the mid-run faults (the others use a third)
    input_key: Callable[[Record], str] = lambda r: r.id


def register(bus: Bus, cfg: BusConfig) -> set[str]:
    import redis

    register_checkpoint(cfg, redis.Redis.from_url(cfg.redis_url), "m")
    return set()


def fit_scorer(bus: Bus, cfg: BusConfig) -> set[str]:
    """The classifier fit on 120 labelled samples (:func:`fit_labelled`); their ids."""
    fit_labelled(bus, cfg, cfg.state_dir / "rep", ClassifierConfig(iterations=30, depth=3, folds=3, threads=1))
    return {f"s{i}" for i in range(120)}


def live_assignments(bus: Bus, n: int, part: int) -> set[str]:
    rng = random.Random(part)
    first = 1000 + 100_000 * part
    live = [a for i in range(first, first + n) for a in assignments(i, i % 2 == 0, rng)]
    rng.shuffle(live)
    for a in live:
        bus.send(Output(ASSIGNMENTS, a, key=a.sample_id))
    bus.flush()
    return {f"s{i}" for i in range(first, first + n)}


def fit_clusters(bus: Bus, cfg: BusConfig) -> set[str]:
    """Three heads fitted (in this process) on 90 embeddings each. The fit publishes their
    batch labels as assignments: the assigner's own outputs are counted from the end of those."""
    from services.cluster import ClusterServiceConfig, FitWorker, plan

    fitted = synthetic_embeddings(bus, 90)
    ccfg = ClusterServiceConfig(**vars(cfg), cluster=ClusterConfig(min_cluster_size=10, min_samples=5), version="v1")
    plan(ccfg)
    FitWorker(ccfg).processor().run(idle_timeout_s=8, until_caught_up=True)
    (cfg.state_dir / "assign-from.json").write_text(json.dumps(
        {str(tp.partition): o for tp, o in topic_end_offsets(bus, ASSIGNMENTS).items()}))
    return set(fitted)


def assigner_outputs(bus: Bus, cfg: BusConfig) -> list[tuple[str, str]]:
    start_at = {int(p): o for p, o in json.loads((cfg.state_dir / "assign-from.json").read_text()).items()}
    return [(m.record.id, m.record.id.split("#")[0]) for m in read_range(bus, ASSIGNMENTS)
            if m.offset >= start_at.get(m.partition, 0)]


def files(bus: Bus, n: int, part: int) -> set[str]:
    fs = java_files(n, f"x{part}-")
    for f in fs:
        bus.send(Output(FILES, f))
    bus.flush()
    return {f.id for f in fs}


def samples_per_file(bus: Bus) -> int:
    distinct = {m.record.id: m.record for m in read_range(bus, SAMPLES)}.values()
    return max(Counter(s.file_id for s in distinct).values())


def nothing(bus: Bus, cfg: BusConfig) -> set[str]:
    return set()


SERVICES = {
    "producer": Service(
        "producer", FILES, ["produce", "--model", "{tiny}", "--mine-per-task", "100000", "--balance-slack", "100000"],
        nothing, files,
        lambda bus, cfg: [(m.record.id, m.record.file_id) for m in read_range(bus, SAMPLES)],
        lambda bus: 2 * samples_per_file(bus),  # a batch is 2 files
        (SAMPLES, 40), size=24),
    "encoder": Service(
        "encoder", PATTERNS_MINE, ["encode", "--checkpoint", "m", "--batch-size", "16"],
        register, lambda bus, n, part: patterns(bus, n, tag=f"{part}-", topics=(PATTERNS_MINE,)),
        lambda bus, cfg: [(m.record.id, m.record.sample_id) for m in read_range(bus, EMBEDDINGS)],
        lambda bus: 16, (EMBEDDINGS, 200), size=1500, input_key=by_sample),
    "assigner": Service(
        "assigner", EMBEDDINGS, ["assign"],
        fit_clusters, lambda bus, n, part: set(synthetic_embeddings(bus, n, seed=3 + part, offset=10_000 * (part + 1))),
        assigner_outputs, lambda bus: 256, (ASSIGNMENTS, 1200), size=500),
    "scorer": Service(
        "scorer", ASSIGNMENTS, ["classify", "serve", "--threads", "1"],
        fit_scorer, live_assignments,
        lambda bus, cfg: [(m.record.id, m.record.sample_id) for m in read_range(bus, SCORES)],
        lambda bus: 2048, (SCORES, 250), size=1500, input_key=by_sample),
}


# -- bad input ----------------------------------------------------------------------------------
def poison(topic: Topic) -> dict[str, bytes]:
    """Undecodable messages for ``topic``, each for a different reason; each of the first
    four crashed a decoder once (RecursionError, ValueError) or could."""
    schema = topic.record.SCHEMA.encode()
    head = b'{"schema":"' + schema + b'","v":1,"id":"poison"'
    return {
        "header nested 100k deep": envelope(b'{"id":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "5000-digit int": envelope(head + b',"layer":' + b"9" * 5000 + b"}"),
        "NaN in the header": envelope(head + b',"layer":NaN}'),
        "not an envelope": b"\x00\x01 garbage",
        "wrong schema": envelope(b'{"schema":"nope","v":1,"id":"y"}'),
        "missing fields": envelope(head + b"}"),
    }


def nan_embedding() -> bytes:
    from apmae.messages import encode

    return encode(EmbeddingRecord(id="nan-emb", sample_id="nan", model="m", task="identifier", layer=0, head=0,
                                  correct=True, checkpoint="ck@1", dim=32,
                                  payload=np.full(32, np.nan, dtype="<f4").tobytes()))


def publish_bad(bus, svc: Service, fault: str) -> None:
    cases = poison(svc.input_topic) if fault == "poison" else {
        "over the size limit": envelope(b'{"schema":"' + svc.input_topic.record.SCHEMA.encode() + b'","v":1}',
                                        b"\x00" * (LIMIT + 16 * 1024))}
    if fault == "poison" and svc.name == "assigner":
        cases["NaN embedding"] = nan_embedding()  # decodes; the assigner rejects it
    for name, value in cases.items():
        bus.producer.send(bus.name(svc.input_topic), key=f"poison:{name}".encode(), value=value)
    bus.flush()


# -- the matrix -----------------------------------------------------------------------------------
FAILPOINTS = {"kill mid-publish": "mid-publish=kill@2", "kill flush-to-mark": "after-flush=kill@2",
              "flush failure": "flush=raise@2"}
FAULTS = [*FAILPOINTS, "poison", "oversize", "Redis restart", "broker restart"]


# Cells out of the gate (none now). assigner x broker restart was out from 2026-12-02 to
# 2026-12-03: in 4 runs it passed twice; once it stopped "idle" with 490 of 1770 unread (fixed
# below), and once its member polled for 10 minutes after the restart and never read its tail,
# kafka-python's poll blocked in NetworkSelector.run (py-spy, seen on the producer). Services
# now start themselves again on a stalled consumer or a poll that does not return
# (services.bus.ConsumerStalled, services.runtime.run_loop); with that it passed (1770/1770)
# and came back in; scripts/fault-suite-repeat.sh counts its runs since.
OPEN: set[tuple[str, str]] = set()

# The cells that joined the gate in session 7 each failed here first:
# - assigner, every fault: its first UMAP transform (numba compiling) outlasted the 8 s poll
#   interval and the member was expelled; the next run's members of the unprefixed group
#   "assign" never got partitions. Now the transform keeps the membership alive and group ids
#   carry the topic prefix.
# - assigner x broker restart: stopped "idle" while the broker was away (empty polls) and left
#   490 of 1770 unread. Now a stage is idle only when its input is read to its end, or after
#   3 more idle timeouts of waiting for it (then it stops with an error).
# - scorer x broker restart: lost 194 of 1620 in the first full run of the suite. A batch
#   whose flush failed left its rows queued for the "scored" mark; the next batch's flush
#   marked them, and their redelivered assignments were dropped. The queue is now reset
#   before every batch (Processor.on_batch_start).
# - producer and scorer x broker restart: lost 18 of 24 files and 1032 of 1620 rows until
#   consumers refreshed metadata every 10 s (the group leader assigned no partitions of topics
#   the restarted broker had not loaded yet).
CELLS = [(s, f) for s in SERVICES for f in FAULTS if (s, f) not in OPEN]


@pytest.mark.parametrize(("service", "fault"), CELLS)
def test_every_input_is_one_output_or_one_dead_letter(service, fault, cfg, durable, tiny_model_dir):
    svc = SERVICES[service]
    bus = Bus(cfg, "test")
    bus.ensure_topics()
    mid_run = fault in ("Redis restart", "broker restart")
    n = svc.size if mid_run else max(svc.size // 3, 12)
    inputs = svc.prepare(bus, cfg) | svc.feed(bus, n, 0)
    if fault in ("poison", "oversize"):  # bad input between good input: the service keeps going
        publish_bad(bus, svc, fault)
        inputs |= svc.feed(bus, n, 1)
    where = inputs_of(bus, svc.input_topic, svc.input_key)
    bad = {i for i, k in where.values() if k.startswith(b"poison:")}
    args = [a.replace("{tiny}", str(tiny_model_dir)) for a in svc.args]
    env = {"APMAE_MAX_MESSAGE_BYTES": LIMIT}
    # each run stops as soon as its group has read the input to the end (no idle wait); the
    # idle timeout only bounds a wait for a broker that went away
    args.append("--until-caught-up")

    if fault in FAILPOINTS:
        first = start([*args, "--idle-timeout", "10"], cfg, APMAE_FAILPOINTS=FAILPOINTS[fault], **env)
        _, err = communicate(first)
        if fault.startswith("kill"):
            assert first.returncode == -9, f"the failpoint never fired: {err[-2000:]}"
            # the restart waits out the dead member's session before its partitions come back
            finish(start([*args, "--idle-timeout", "20"], cfg, **env))
        else:
            assert first.returncode == 0, err[-3000:]
            assert "failpoint flush" in err, "the flush failure was never injected"
    elif mid_run:
        proc = start([*args, "--idle-timeout", "30"], cfg, **env)
        which = ("redis",) if fault == "Redis restart" else ("broker",)  # the broker brings its S3 store

        def outage() -> None:
            for s in servers(durable, which):
                s.stop()
            time.sleep(3)  # the service keeps polling, fails its batches, backs off
            for s in servers(durable, which):
                s.start()

        topic, k = svc.progress
        wait_then(proc, lambda: count_so_far(bus, topic)() >= k, outage)
        bus = Bus(cfg, "test")  # the test's own clients reconnect too
        out, err = communicate(proc)
        own = [line for line in err.splitlines() if " kafka." not in line]  # the client's retries drown the rest
        print(f"--- {service} log after the {fault}:\n" + "\n".join(own[-80:]))  # shown when the cell fails
        assert proc.returncode == 0, err[-3000:]
    else:
        finish(start([*args, "--idle-timeout", "10"], cfg, **env))

    dead, other = dead_lettered(bus, where, svc.input_key)
    assert not other, [(d.source_topic, d.reason) for d in other]
    account(service, inputs | bad, svc.outputs(bus, cfg), dead, fault=fault,
            max_duplicates=0 if fault in ("poison", "oversize") else svc.batch_bound(bus), expect_dead=bad)
    for m in read_range(bus, DEADLETTER):  # a dead letter always fits, whatever its input's size
        assert len(m.value) <= LIMIT, (m.record.reason, len(m.value))

