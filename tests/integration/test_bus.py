"""The bus against the real embedded broker and Redis: at-least-once, no duplicates, DLQ."""

from __future__ import annotations

import threading
import time

import pytest
from kafka.errors import CommitFailedError, RebalanceInProgressError

from apmae.messages import decode, encode, stable_id
from apmae.topics import DEADLETTER, FILES, SCORES, DeadLetterRecord, FileRecord, ScoreRecord
from services.bus import Bus, DoneStore, Output, Processor, read_range


def files(n: int, tag: str = "") -> list[FileRecord]:
    return [FileRecord(id=stable_id("f", tag, i), source="test", path=f"F{i}.java", content="x" * i) for i in range(n)]


def publish(bus: Bus, recs) -> None:
    bus.ensure_topics()
    for r in recs:
        bus.send(Output(FILES, r))
    bus.flush()


def score(msgs):
    """A real transform: one score per file, id derived from the input id."""
    for m in msgs:
        yield Output(SCORES, ScoreRecord(id=stable_id("score", m.record.id), sample_id=m.record.id, model="m",
                                         task="t", prob_correct=len(m.record.content) / 100, actual=None,
                                         classifier_version="v0"))


def read_all(bus: Bus, topic):
    return [m for m in read_range(bus, topic)]


def test_produce_consume_commit(bus_cfg):
    bus = Bus(bus_cfg, "t-basic")
    publish(bus, files(20))
    p = Processor(bus, "g-basic", [FILES], score, batch_size=7)
    assert p.run(max_messages=20, idle_timeout_s=20) == 20
    out = read_all(bus, SCORES)
    assert sorted(m.record.sample_id for m in out) == sorted(r.id for r in files(20))
    # committed: the same group sees nothing new
    again = Processor(bus, "g-basic", [FILES], score)
    assert again.run(idle_timeout_s=4) == 0


def test_keepalive_runs_the_work_on_the_calling_thread_and_keeps_the_group(bus_cfg, monkeypatch):
    """A batch whose work outlasts max_poll_interval (8 s here), as one long call and as many
    short ones, keeps its partitions: the helper thread polls paused whenever a poll is due,
    so the batch commits once and no input is handled twice. The work runs on the caller's
    thread (it ran on a fresh thread per call, whose torch ops got their own OpenMP team:
    a forward at ~0.8x beside it). A member that lost the group and rejoined would also
    commit once (the old heartbeat rejoined within the long call), so the assignments are
    counted too: one, the first."""
    from services import metrics

    bus = Bus(bus_cfg, "t-keepalive")
    publish(bus, files(6, "keepalive"))
    seen: list[str] = []
    on_caller: set[bool] = set()
    p: Processor

    def work(seconds: float) -> None:
        on_caller.add(threading.get_ident() == caller)
        time.sleep(seconds)

    def handler(msgs):
        nonlocal caller
        caller = threading.get_ident()
        if not seen:  # the first batch: 20 short pieces (10 s), then one long one (9 s)
            for _ in range(20):
                p.keepalive(lambda: work(0.5))
            p.keepalive(lambda: work(9))
        seen.extend(m.record.id for m in msgs)
        return score(msgs)

    caller = 0
    assignments: list[int] = []
    joined = Processor.on_partitions_assigned
    monkeypatch.setattr(Processor, "on_partitions_assigned",
                        lambda self, assigned: (assignments.append(len(assigned)), joined(self, assigned)))
    errors = sum(s.value for s in metrics.ERRORS.collect()[0].samples
                 if s.name.endswith("_total") and s.labels["service"] == "t-keepalive")
    p = Processor(bus, "g-keepalive", [FILES], handler, batch_size=6)
    assert p.run(until_caught_up=True, idle_timeout_s=30) == 6
    assert on_caller == {True}  # on the calling thread, every time
    assert len(assignments) == 1  # never expelled: no second assignment
    assert sorted(seen) == sorted(f.id for f in files(6, "keepalive"))  # once each: the batch kept its partitions
    assert sum(s.value for s in metrics.ERRORS.collect()[0].samples
               if s.name.endswith("_total") and s.labels["service"] == "t-keepalive") == errors


def _wait_for_prefetch(p: Processor, seconds: float = 20.0) -> bool:
    """Inside a handler: whether the processor's helper fetched the next batch meanwhile."""
    deadline = time.monotonic() + seconds
    while not p._prefetched and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(p._prefetched)


def test_the_next_batch_is_fetched_while_the_handler_runs_and_never_committed_early(bus_cfg):
    """The handler of each batch but the last finds the next one already fetched (the poll
    overlapped it), on the loop's own thread; every commit stops at its own batch's last
    offset, never at the fetched-ahead one's; each input is handled once. After its fetch the
    helper polls no more: a handler that hangs must still lose its partitions after
    max_poll_interval (only ``keepalive`` work is kept in the group)."""
    bus = Bus(bus_cfg, "t-prefetch")
    publish(bus, files(30, "prefetch"))
    handled: dict[int, int] = {}  # partition -> last offset handled
    seen: list[str] = []
    ahead: list[bool] = []
    threads: set[int] = set()
    commits: list[bool] = []
    quiet_after_fetch: list[bool] = []

    def handler(msgs):
        threads.add(threading.get_ident())
        if len(seen) + len(msgs) < 30:  # more to come: it arrives while this batch is handled
            ahead.append(_wait_for_prefetch(p))
        if not quiet_after_fetch:
            last_poll = p.polled_at
            time.sleep(1.5)  # a heartbeat would be due after 1 s
            quiet_after_fetch.append(p.polled_at == last_poll)
        for m in msgs:
            handled[m.partition] = max(handled.get(m.partition, -1), m.offset)
        seen.extend(m.record.id for m in msgs)
        return score(msgs)

    def on_commit(offsets):
        commits.append(all(off == handled[tp.partition] + 1 for tp, off in offsets.items()))

    # prefetch_min_s=0: fetch ahead after every handler, however quick (a wait that the fetch
    # ended at once must not turn the next turn's fetch off)
    p = Processor(bus, "g-prefetch", [FILES], handler, batch_size=10, on_commit=on_commit, prefetch_min_s=0)
    assert p.run(max_messages=30, idle_timeout_s=20) == 30
    assert ahead and all(ahead), ahead
    assert quiet_after_fetch == [True]
    assert threads == {threading.get_ident()}
    assert commits and all(commits), commits
    assert sorted(seen) == sorted(f.id for f in files(30, "prefetch"))
    assert len(read_all(bus, SCORES)) == 30
    # every partition committed to its end: the same group finds nothing left
    assert Processor(bus, "g-prefetch", [FILES], score).run(idle_timeout_s=4) == 0


def test_prepare_gets_the_next_batch_on_the_helper_and_the_handler_gets_the_same_messages(bus_cfg):
    """``prepare``: the helper that fetched the next batch decodes its envelopes and hands the
    messages to ``prepare`` (not on the loop's thread) while this batch's handler runs; the
    loop then hands that batch's handler those very messages, not a second decode. The first
    batch, polled in line, is not prepared. A ``prepare`` that raises costs only its own work:
    every input is still handled once and committed, and the error is counted."""
    from prometheus_client import REGISTRY

    bus = Bus(bus_cfg, "t-prepare")
    publish(bus, files(30, "prepare"))
    prepared: dict[str, object] = {}  # id -> the message object prepare was given
    prepare_threads: set[int] = set()
    handed: list[list[bool]] = []  # per batch: whether each message is the one prepare was given
    ahead: list[bool] = []
    seen: list[str] = []

    def prepare(msgs):
        prepare_threads.add(threading.get_ident())
        prepared.update({m.record.id: m for m in msgs})

    def handler(msgs):
        handed.append([prepared.get(m.record.id) is m for m in msgs])
        if len(seen) + len(msgs) < 30:
            ahead.append(_wait_for_prefetch(p))
        seen.extend(m.record.id for m in msgs)
        return score(msgs)

    p = Processor(bus, "g-prepare", [FILES], handler, batch_size=10, prefetch_min_s=0, prepare=prepare)
    # the failure series exists from the start, at 0, as the dead-letter series do
    assert REGISTRY.get_sample_value("apmae_prepare_failures_total", {"service": "t-prepare"}) == 0
    assert p.run(max_messages=30, idle_timeout_s=20) == 30
    assert ahead and all(ahead), ahead
    assert len(handed) >= 2 and not any(handed[0]) and all(all(b) for b in handed[1:]), handed
    assert prepare_threads and threading.get_ident() not in prepare_threads
    assert sorted(seen) == sorted(f.id for f in files(30, "prepare"))

    def failing(msgs):
        raise ValueError("prepare broke")

    def errors() -> float:
        return REGISTRY.get_sample_value("apmae_prepare_failures_total", {"service": "t-prepare"}) or 0

    def waits_for_the_next(msgs):
        if len(seen) + len(msgs) < 30:
            _wait_for_prefetch(again)
            time.sleep(0.2)  # and for its prepare (skipped once the handler has returned)
        seen.extend(m.record.id for m in msgs)
        return score(msgs)

    before, seen[:] = errors(), []
    again = Processor(bus, "g-prepare-fails", [FILES], waits_for_the_next, batch_size=10, prefetch_min_s=0,
                      prepare=failing)
    assert again.run(max_messages=30, idle_timeout_s=20) == 30
    assert sorted(seen) == sorted(f.id for f in files(30, "prepare"))
    assert errors() > before  # at least one batch was fetched ahead, and its prepare's failure counted
    assert len(read_all(bus, SCORES)) == 60  # both groups scored every file
    assert Processor(bus, "g-prepare-fails", [FILES], score).run(idle_timeout_s=4) == 0


# prefetch_min_s well above a no-op handler's time even on a loaded machine (a GIL hand-off
# from the client's IO thread alone can take its 5 ms switch interval), and below a slow one's
@pytest.mark.parametrize("handler_s, fetched_ahead", [(0.0, False), (0.3, True)])
def test_the_next_batch_is_fetched_ahead_only_beside_a_handler_that_takes_a_while(bus_cfg, handler_s, fetched_ahead):
    """A helper thread costs its start, join and polls; beside a handler that returns at once
    it overlaps nothing. So after a handler quicker than ``prefetch_min_s`` the next batch is
    polled in line, and after a slower one it is fetched ahead; the first batch always is
    (nothing known yet). Either way each input is handled once and committed."""
    bus = Bus(bus_cfg, f"t-prefetch-when-{handler_s}")
    publish(bus, files(30, f"pw{handler_s}"))
    beside: list[bool] = []  # per batch: a helper thread was fetching while its handler ran
    seen: list[str] = []

    def handler(msgs):
        beside.append(p._helper is not None)
        time.sleep(handler_s)
        seen.extend(m.record.id for m in msgs)
        return score(msgs)

    p = Processor(bus, f"g-prefetch-when-{handler_s}", [FILES], handler, batch_size=5, prefetch_min_s=0.25)
    assert p.run(until_caught_up=True, idle_timeout_s=20) == 30
    assert len(beside) >= 3 and beside[0], beside
    assert beside[1:] == [fetched_ahead] * (len(beside) - 1), beside
    assert sorted(seen) == sorted(f.id for f in files(30, f"pw{handler_s}"))
    assert Processor(bus, f"g-prefetch-when-{handler_s}", [FILES], score).run(idle_timeout_s=4) == 0


@pytest.mark.parametrize("prepared", [False, True])
def test_a_failed_batch_rewinds_past_the_batch_fetched_ahead_of_it(bus_cfg, prepared):
    """A batch that fails retryably after the next one was fetched: both are read again;
    nothing is skipped and nothing handled twice. The run reads to the end (no max_messages),
    so a fetched-ahead batch handled before the rewound one and then read again would show as
    handled twice. With ``prepare``, the batch prepared before the failure is decoded afresh
    when read again: its handler never gets the messages prepared before the rewind (each
    turn drops what was decoded ahead for another batch, and reuses only the very records
    fetched)."""
    bus = Bus(bus_cfg, f"t-prefetch-fail-{prepared}")
    publish(bus, files(30, "pf"))
    done_ids: list[str] = []
    failed: list[list[str]] = []
    prepared_msgs: list = []  # every message prepare was given
    stale: list = []  # ... those given before the failure
    handed_after: list = []  # the messages handed to handlers after the failure

    def handler(msgs):
        ids = [m.record.id for m in msgs]
        if not failed and len(done_ids) + len(msgs) < 30:
            if not _wait_for_prefetch(p):
                pytest.fail("nothing was fetched ahead")  # not an Exception: the loop does not swallow it
            deadline = time.monotonic() + 5
            while prepared and not prepared_msgs and time.monotonic() < deadline:
                time.sleep(0.01)
            stale.extend(prepared_msgs)
            failed.append(ids)
            raise ConnectionError("broker went away mid-batch")  # transient: rewind, retry
        if failed:
            handed_after.extend(msgs)
        done_ids.extend(ids)
        return score(msgs)

    p = Processor(bus, f"g-prefetch-fail-{prepared}", [FILES], handler, batch_size=10,
                  prepare=prepared_msgs.extend if prepared else None)
    assert p.run(until_caught_up=True, idle_timeout_s=20) == 30
    assert failed and set(failed[0]) <= set(done_ids)
    assert sorted(done_ids) == sorted(f.id for f in files(30, "pf"))  # each once: none skipped, none twice
    if prepared:
        stale_ids = {m.record.id for m in stale}
        assert stale_ids and stale_ids <= {m.record.id for m in handed_after}  # read again after the rewind...
        assert not any(m is s for m in handed_after for s in stale)  # ... and decoded afresh
    out = [m.record.sample_id for m in read_all(bus, SCORES)]
    assert sorted(out) == sorted(f.id for f in files(30, "pf"))


def test_a_batch_fetched_ahead_survives_a_failed_check_after_a_rebalance(bus_cfg):
    """After a rebalance the loop asks the broker whether its committed offsets survived
    (``_check_vanished_offsets``); when that lookup fails (a coordinator moving), the batch in
    hand, fetched during the last handler with the position already past it, is read again
    rather than dropped, and the check is retried. The run reads to the end: a dropped batch
    would leave its inputs unhandled with the stage finished."""
    from kafka.errors import KafkaTimeoutError

    bus = Bus(bus_cfg, "t-prefetch-check")
    publish(bus, files(30, "pc"))
    done_ids: list[str] = []
    lookups: list[bool] = []

    def handler(msgs):
        if not lookups and len(done_ids) + len(msgs) < 30:
            if not _wait_for_prefetch(p):
                pytest.fail("nothing was fetched ahead")
            p._assigned_now = list(p.consumer.assignment())  # as a rebalance during the fetch leaves it
            real = p.consumer.committed

            def committed(tp, timeout_ms=None):
                if not lookups:
                    lookups.append(False)
                    raise KafkaTimeoutError("coordinator moving")
                lookups.append(True)
                return real(tp, timeout_ms=timeout_ms)

            p.consumer.committed = committed
        done_ids.extend(m.record.id for m in msgs)
        return score(msgs)

    p = Processor(bus, "g-prefetch-check", [FILES], handler, batch_size=10)
    assert p.run(until_caught_up=True, idle_timeout_s=20) == 30
    assert lookups[:1] == [False] and True in lookups  # it failed once, then was retried
    assert sorted(done_ids) == sorted(f.id for f in files(30, "pc"))


def test_with_the_ending_overlapped_each_batch_is_committed_beside_the_next_handler_after_its_own_flush(bus_cfg):
    """overlap_ending: a helper thread, not the handler's, publishes, flushes and commits
    batch k while batch k+1 is handled; every commit stops at its own batch's last offset
    (never the batch handled beside it); the last batch is committed when the input runs
    dry; each input is handled once and the group is committed to the end."""
    bus = Bus(bus_cfg, "t-overlap")
    publish(bus, files(30, "overlap"))
    handler_threads: set[int] = set()
    batches: list[dict[int, int]] = []  # per handled batch: partition -> last offset
    commits: list[tuple[int, dict[int, int]]] = []  # (committing thread, partition -> offset)
    events: list[str] = []  # flushes and commits, in order
    beside: list[bool] = []  # per handler after the first: the batch before was committed while it ran
    seen: list[str] = []
    real_flush = bus.flush

    def flush(timeout=60.0):
        events.append("flush")
        return real_flush(timeout)

    bus.flush = flush

    def handler(msgs):
        handler_threads.add(threading.get_ident())
        if batches:  # the batch before ends beside this handler: its commit comes while we wait
            deadline = time.monotonic() + 20
            while len(commits) < len(batches) and time.monotonic() < deadline:
                time.sleep(0.01)
            beside.append(len(commits) == len(batches))
        last: dict[int, int] = {}
        for m in msgs:
            last[m.partition] = max(last.get(m.partition, -1), m.offset)
        batches.append(last)
        seen.extend(m.record.id for m in msgs)
        return score(msgs)

    def on_commit(offsets):
        events.append("commit")
        commits.append((threading.get_ident(), {tp.partition: off for tp, off in offsets.items()}))

    # a long poll: an empty one mid-stream (a loaded machine) would end the batch in hand on
    # the loop's thread, with nothing beside it
    p = Processor(bus, "g-overlap", [FILES], handler, batch_size=10, on_commit=on_commit, overlap_ending=True,
                  poll_timeout_ms=5000)
    assert p.run(idle_timeout_s=5) == 30
    assert sorted(seen) == sorted(f.id for f in files(30, "overlap"))
    assert len(batches) >= 2 and len(commits) == len(batches)
    # batch k's commit is its own offsets + 1, in order, each after its own flush (the loop's
    # closing flush follows)
    assert [c for _, c in commits] == [{part: off + 1 for part, off in b.items()} for b in batches]
    assert events[:2 * len(batches)] == ["flush", "commit"] * len(batches), events
    assert beside and all(beside), beside
    # the helper, not the handler's thread, committed each batch while the next was handled
    assert all(t not in handler_threads for t, _ in commits[:-1]), (handler_threads, commits)
    assert commits[-1][0] in handler_threads  # nothing to overlap the last one with: the loop's own thread
    assert sorted(m.record.sample_id for m in read_all(bus, SCORES)) == sorted(seen)
    assert Processor(bus, "g-overlap", [FILES], score).run(idle_timeout_s=4) == 0


def test_a_failed_ending_reads_its_batch_and_the_one_handled_beside_it_again(bus_cfg):
    """overlap_ending: when batch k's flush fails on the helper (a broker that stops
    acknowledging), neither batch k nor batch k+1, handled meanwhile, is committed; both are
    read again and handled again; nothing else is repeated and nothing is skipped."""
    from kafka.errors import KafkaTimeoutError

    bus = Bus(bus_cfg, "t-overlap-fail")
    publish(bus, files(40, "of"))
    handled: list[list[str]] = []
    flushes = [0]
    failed_on: list[int] = []  # the thread whose flush failed
    real_flush = bus.flush

    def flush(timeout=60.0):
        flushes[0] += 1
        if flushes[0] == 2:  # the 2nd batch's ending
            failed_on.append(threading.get_ident())
            raise KafkaTimeoutError("not acknowledged")
        return real_flush(timeout)

    bus.flush = flush

    def handler(msgs):
        handled.append([m.record.id for m in msgs])
        return score(msgs)

    p = Processor(bus, "g-overlap-fail", [FILES], handler, batch_size=10, overlap_ending=True,
                  poll_timeout_ms=5000)  # no empty poll mid-stream: batch 2 ends beside batch 3
    assert p.run(until_caught_up=True, idle_timeout_s=20) == 40
    ids = [i for b in handled for i in b]
    assert set(ids) == {f.id for f in files(40, "of")}  # none skipped
    twice = {i for i in ids if ids.count(i) == 2}
    assert twice == set(handled[1]) | set(handled[2])  # the failed batch and the one beside it, once more each
    assert max(map(ids.count, ids)) == 2
    assert failed_on and failed_on[0] != threading.get_ident()  # it failed on the helper, beside batch 3


def test_with_the_ending_overlapped_an_input_resent_in_the_next_batch_is_handled_once(bus_cfg, redis_client):
    """A producer's retry puts a copy right after the original, so with one input per batch
    the copy arrives while the original's ending (and its done mark) is still to come: the
    done store cannot know it yet, the batch in hand does."""
    bus = Bus(bus_cfg, "t-overlap-dup")
    recs = files(8, "od")
    bus.ensure_topics()
    for r in recs:
        bus.send(Output(FILES, r))
        bus.send(Output(FILES, r))  # the retry's copy, next in its partition
    bus.flush()
    seen: list[str] = []

    def handler(msgs):
        seen.extend(m.record.id for m in msgs)
        return score(msgs)

    p = Processor(bus, "g-overlap-dup", [FILES], handler, done=DoneStore(redis_client, "g-overlap-dup"),
                  batch_size=1, overlap_ending=True)
    assert p.run(until_caught_up=True, idle_timeout_s=20) == 16
    assert sorted(seen) == sorted(r.id for r in recs)  # each once


def test_with_the_ending_overlapped_a_graceful_stop_commits_the_batch_in_hand(bus_cfg):
    """A stop (SIGTERM) while a batch is handled: the loop ends it (publish, flush, commit)
    before it closes, so the group's next member starts right after it."""
    bus = Bus(bus_cfg, "t-overlap-stop")
    publish(bus, files(30, "os"))
    handled = [0]
    p: Processor

    def handler(msgs):
        handled[0] += len(msgs)
        if handled[0] >= 15:
            p.stop_event.set()  # what SIGTERM does, mid-batch
        return score(msgs)

    p = Processor(bus, "g-overlap-stop", [FILES], handler, batch_size=10, overlap_ending=True)
    p.run(idle_timeout_s=20)
    assert p.processed == handled[0]  # every handled batch committed, the last one included
    assert len(read_all(bus, SCORES)) == handled[0]  # ... and published
    assert Processor(bus, "g-overlap-stop", [FILES], score).run(idle_timeout_s=5) == 30 - handled[0]


def test_overlap_ending_refuses_a_handler_with_batch_state(bus_cfg):
    with pytest.raises(ValueError, match="overlap_ending"):
        Processor(Bus(bus_cfg, "t"), "g", [FILES], score, on_flushed=lambda: None, overlap_ending=True)


def test_consumer_lag_is_probed_lag_every_s_into_a_run_not_at_its_first_batch(bus_cfg, monkeypatch):
    """The lag probe starts a consumer of its own (bootstrap, metadata, offsets): ~9% of a
    short consume's CPU on 2 cores when it started at the first batch (benchmarks/bus.py).
    A run shorter than ``lag_every_s`` never starts it; a run past it hands over its
    committed positions, and the probe turns them into the true lag."""
    from prometheus_client import REGISTRY

    from services.bus import LagProbe

    bus = Bus(bus_cfg, "t-lag")
    publish(bus, files(30, "lag"))
    observed: list[dict] = []
    real = LagProbe.observe
    monkeypatch.setattr(LagProbe, "observe", lambda self, pos: (observed.append(dict(pos)), real(self, pos))[1])

    short = Processor(bus, "g-lag-short", [FILES], score, batch_size=10, lag_every_s=3600)
    assert short.run(max_messages=10, idle_timeout_s=20) == 10
    assert observed == []  # never due: the probe was never started

    due = Processor(bus, "g-lag", [FILES], score, batch_size=10, lag_every_s=0.0)
    assert due.run(max_messages=20, idle_timeout_s=20) == 20
    assert observed and sum(observed[-1].values()) == 20  # after the last batch: its commits

    probe = LagProbe(bus, "t-lag", "g-lag", every_s=0.1)
    probe.observe(observed[-1])
    try:
        deadline = time.monotonic() + 60
        labels = {"service": "t-lag", "topic": FILES.name}
        while REGISTRY.get_sample_value("apmae_consumer_lag_messages", labels) != 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert REGISTRY.get_sample_value("apmae_consumer_lag_messages", labels) == 10  # 30 in, 20 read
    finally:
        probe.close()


def test_a_tenants_group_is_not_rebalanced_by_another_tenants_members(bus_cfg):
    """Group ids are under the topic prefix. Unprefixed, tenant B's member joining "g-tenant"
    rebalanced tenant A's group of that name: A, busy in a long batch, was revoked and B
    waited for it (the fault matrix's assigner never got partitions behind a stale member)."""
    from dataclasses import replace

    from kafka import ConsumerRebalanceListener

    class Revocations(ConsumerRebalanceListener):
        count = 0

        def on_partitions_revoked(self, revoked):
            Revocations.count += bool(revoked)

        def on_partitions_assigned(self, assigned):
            pass

    a = Bus(bus_cfg, "t-tenant-a")
    b = Bus(replace(bus_cfg, topic_prefix=bus_cfg.topic_prefix + "b."), "t-tenant-b")
    assert a.group_id("g-tenant") != b.group_id("g-tenant")
    publish(a, files(3, "tenant-a"))
    publish(b, files(4, "tenant-b"))
    # A may go a minute without polling: its group holds it through B's run
    busy = a.consumer("g-tenant", [FILES], listener=Revocations(), max_poll_interval_ms=60_000)
    deadline = time.monotonic() + 30
    while not busy.assignment() and time.monotonic() < deadline:
        busy.poll(200)
    assert busy.assignment()
    # A now sits in a long batch (no poll) while B's member joins its own group and works
    assert Processor(b, "g-tenant", [FILES], score).run(max_messages=4, idle_timeout_s=20) == 4
    for _ in range(5):
        busy.poll(200)
    revoked = Revocations.count  # before close(), which revokes everything
    busy.close()
    assert revoked == 0


def test_a_leader_that_stops_while_a_member_joins_leaves_a_group_that_forms_again(bus_cfg):
    """The embedded broker keeps a member that sends LeaveGroup while its group is forming as
    the group's leader, and such a group never forms again (a fresh member got nothing in
    40 s; the dead fit worker test failed in CI on it). Consumers here leave by going
    silent: the broker evicts the stopped leader when its session expires and the newcomer
    takes every partition. With ``leave_group`` on (Kafka) this test waits forever."""
    bus = Bus(bus_cfg, "t-leave")
    publish(bus, files(4, "leave"))
    leader = bus.consumer("g-leave", [FILES])
    while not leader.assignment():
        leader.poll(200)
    newcomer = bus.consumer("g-leave", [FILES])
    joined = threading.Event()
    stop = threading.Event()

    def join() -> None:
        while not newcomer.assignment() and not stop.is_set():
            newcomer.poll(200)
        joined.set()

    t = threading.Thread(target=join, daemon=True)
    t.start()
    # the newcomer's first JoinGroup (answered with its member id) puts the group into forming
    # under the leader; that is when the leader must stop
    while not newcomer._coordinator._generation.member_id and t.is_alive():
        time.sleep(0.05)
    time.sleep(0.5)
    leader.close()
    # a liveness bound, far past the session timeout the eviction waits for
    joined.wait(120)
    stop.set()
    t.join(10)
    got = {p.partition for p in newcomer.assignment()}
    newcomer.close()
    assert got == set(range(FILES.partitions)), got


def test_a_stage_reads_to_the_end_however_slow_its_group_join(bus_cfg):
    """A batch stage stops when its input is read to the end, not on a guess of how long to
    wait; and a short idle timeout counts from the group join, not from the start of the run
    (joining took seconds on the loaded CI machine, longer than the demo's idle timeouts)."""
    bus = Bus(bus_cfg, "t-drain")
    for i in range(5):  # five record batches, so the end is more than one fetch away
        publish(bus, files(9, f"drain{i}"))
    p = Processor(bus, "g-drain", [FILES], score, batch_size=8)
    assert p.run(until_caught_up=True) == 45  # no idle timeout at all: it stops at the end
    assert len({m.record.sample_id for m in read_all(bus, SCORES)}) == 45
    publish(bus, files(9, "late"))
    short = Processor(bus, "g-drain", [FILES], score)
    # the embedded broker takes 5.0 s to form a group (measured); data follows within a poll
    assert short.run(idle_timeout_s=3) == 9


def test_a_batch_stage_stops_when_its_group_has_read_every_partition_not_only_its_own(bus_cfg):
    """until_caught_up stopped when this member's partitions were read: with a peer (or a dead
    member whose session had not expired) holding the others, the stage exited 0 and its
    group's input was half read (12 of 40); and a first fix still stopped so once an idle
    timeout passed. Now it waits for the group: here the peer holds its share unread for
    longer than the idle timeout, then leaves, and the stage is given the rest."""
    bus = Bus(bus_cfg, "t-share")
    publish(bus, files(40, "share"))
    stage = Processor(bus, "g-share", [FILES], score, batch_size=8)
    peer = bus.consumer("g-share", [FILES])  # holds its share, reads nothing
    finished = threading.Event()

    def hold_then_leave() -> None:
        while not stage.processed and not finished.is_set():  # in the group until the stage has its share
            peer.pause(*peer.assignment())
            peer.poll(200)
        for _ in range(40):  # ~8 s: longer than the stage's idle timeout, which is no reason to stop
            peer.poll(200)
        peer.close(autocommit=False)  # leaves: the stage is given the rest

    joined(peer)
    holder = threading.Thread(target=hold_then_leave, daemon=True)
    holder.start()
    try:
        assert stage.run(until_caught_up=True, idle_timeout_s=3) == 40
    finally:
        finished.set()
        holder.join(30)
    assert {m.record.sample_id for m in read_all(bus, SCORES)} >= {f.id for f in files(40, "share")}


def test_a_batch_stage_stops_on_its_peers_commits(bus_cfg):
    """The other half of the group check: a peer that reads and commits its share, and stays
    in the group, lets the stage stop once the group's commits reach the ends."""
    bus = Bus(bus_cfg, "t-peer")
    publish(bus, files(40, "peer"))
    stage = Processor(bus, "g-peer", [FILES], score, batch_size=8)
    peer = bus.consumer("g-peer", [FILES])
    read_by_peer: set[str] = set()
    finished = threading.Event()

    def read_and_commit() -> None:
        while not finished.is_set():
            if not (stage.consumer and stage.consumer.assignment()):  # reads nothing before the stage has its share
                peer.pause(*peer.assignment())
                peer.poll(200)
                continue
            peer.resume(*peer.assignment())
            for recs in peer.poll(200, max_records=8).values():
                read_by_peer.update(decode(r.value, FileRecord).id for r in recs)
            try:
                peer.commit()
            except (CommitFailedError, RebalanceInProgressError):  # the stage left (CI saw it): poll rejoins
                continue
        peer.close(autocommit=False)

    read_by_peer.update(joined(peer))
    reader = threading.Thread(target=read_and_commit, daemon=True)
    reader.start()
    try:
        n = stage.run(until_caught_up=True, idle_timeout_s=30)
        assert reader.is_alive()  # the peer is still in the group: the stage stopped on its commits
    finally:
        finished.set()
        reader.join(30)
    scored = {m.record.sample_id for m in read_all(bus, SCORES)}
    assert 0 < n < 40 and len(scored) == n  # each did a share (a rebalance may move partitions between them)
    assert scored | read_by_peer == {f.id for f in files(40, "peer")}


def test_a_batch_stage_whose_peers_never_commit_raises_after_committing_its_own(bus_cfg):
    """A member that stays in the group and reads nothing (after a durable broker restart the
    fault matrix's lone encoder held 2-3 of 8 partitions, and no member ever read the rest)
    kept the stage waiting forever. Now a wait on peers that commit nothing for
    ``peers_stall_s`` is a stall, raised after the stage's own share is committed."""
    from services.bus import ConsumerStalled

    bus = Bus(bus_cfg, "t-idle-peer")
    publish(bus, files(40, "idle-peer"))
    stage = Processor(bus, "g-idle-peer", [FILES], score, batch_size=8, peers_stall_s=5)
    peer = bus.consumer("g-idle-peer", [FILES])
    finished = threading.Event()

    def stay_and_read_nothing() -> None:
        while not finished.is_set():
            peer.pause(*peer.assignment())
            peer.poll(200)
        peer.close(autocommit=False)

    joined(peer)
    holder = threading.Thread(target=stay_and_read_nothing, daemon=True)
    holder.start()
    try:
        with pytest.raises(ConsumerStalled, match="other members committed nothing"):
            stage.run(until_caught_up=True, idle_timeout_s=30)
        assert holder.is_alive()  # the peer was in the group throughout
    finally:
        finished.set()
        holder.join(30)
    own = stage.processed
    assert 0 < own < 40
    admin = bus.admin()
    try:  # the group's commits, read without joining it: the stage's whole share, nothing of the peer's
        group = bus.group_id("g-idle-peer")
        committed = admin.list_group_offsets(group)[group]
    finally:
        admin.close()
    assert sum(o.offset for tp, o in committed.items() if tp.topic == bus.name(FILES) and o.offset > 0) == own
    assert len({m.record.sample_id for m in read_all(bus, SCORES)}) == own


def joined(consumer, timeout_s: float = 30) -> set[str]:
    """Poll ``consumer`` until its group assigns it partitions; the ids it read meanwhile
    (not committed)."""
    deadline, read = time.monotonic() + timeout_s, set()
    while not consumer.assignment() and time.monotonic() < deadline:
        for recs in consumer.poll(200).values():
            read.update(decode(r.value, FileRecord).id for r in recs)
    assert consumer.assignment(), "never joined its group"
    return read


def wedged_stage(bus: Bus, group: str, **kw) -> Processor:
    """A stage whose consumer stops fetching after its first batch (every partition paused
    behind the loop's back): what kafka-python's consumer did after a durable broker restart,
    where it sat at its position with records behind it and never fetched again."""
    p = Processor(bus, group, [FILES], score, batch_size=8, **kw)

    def handler(msgs):
        if p.consumer.assignment() and not p.consumer.paused():
            p.consumer.pause(*p.consumer.assignment())
        return score(msgs)

    p.handler = handler
    return p


def test_a_consumer_that_stops_fetching_with_its_input_unread_raises_after_committing(bus_cfg):
    """Stopping "idle" with the input unread returned success (the fault matrix's producer
    exited 0 with 19 of 24 files unread). A stalled consumer is now an error, raised after the
    batches it did are committed, so the next run of the stage loses nothing."""
    from services import metrics
    from services.bus import ConsumerStalled

    bus = Bus(bus_cfg, "t-wedge")
    publish(bus, files(40, "wedge"))
    stalls = metrics.CONSUMER_STALLED.labels("t-wedge")._value.get()
    p = wedged_stage(bus, "g-wedge", stall_after_s=3)
    with pytest.raises(ConsumerStalled, match="confirms records past it"):
        p.run(idle_timeout_s=5)
    assert p.processed == 8 and metrics.CONSUMER_STALLED.labels("t-wedge")._value.get() == stalls + 1
    again = Processor(bus, "g-wedge", [FILES], score, batch_size=8)
    assert again.run(until_caught_up=True) == 32  # from the commits on: none skipped, none twice
    assert {m.record.sample_id for m in read_all(bus, SCORES)} == {f.id for f in files(40, "wedge")}


def test_a_stalled_service_starts_itself_again_and_finishes(bus_cfg):
    """As a service (run_loop), a stall re-executes the process: same pid, fresh client; it
    resumes from the commits and exits 0 with every input done."""
    import json
    import os
    import subprocess
    import sys

    bus = Bus(bus_cfg, "t-restart")
    publish(bus, files(40, "restart"))
    code = f"""
import os
from dataclasses import replace
from apmae.config import BusConfig
from apmae.topics import FILES
from services.bus import Bus, Processor, RunLimits
from services.runtime import run_loop
from tests.integration.test_bus import score, wedged_stage
cfg = replace(BusConfig(), bootstrap_servers={bus_cfg.bootstrap_servers!r}, redis_url={bus_cfg.redis_url!r},
              topic_prefix={bus_cfg.topic_prefix!r}, state_dir=__import__("pathlib").Path({str(bus_cfg.state_dir)!r}))
bus = Bus(cfg, "t-restart")
if "APMAE_STALL_RESTARTS" in os.environ:  # the process started again: its client is a new one
    p = Processor(bus, "g-restart", [FILES], score, batch_size=8)
else:
    p = wedged_stage(bus, "g-restart", stall_after_s=3)
run_loop(p, "t-restart", cfg, RunLimits(idle_timeout_s=5))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "starting again (1 of 5)" in out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["processed"] == 32
    assert {m.record.sample_id for m in read_all(bus, SCORES)} >= {f.id for f in files(40, "restart")}


@pytest.mark.parametrize("call", ["poll", "commit", "close"])
def test_a_service_whose_client_call_never_returns_starts_itself_again(bus_cfg, call):
    """kafka-python 3.0.12's poll sometimes never returned after a durable broker restart (its
    main thread waits for the IO thread without a timeout), and its commit and close wait on
    that thread the same way. Whichever call hangs, the second one after some input was
    handled (the close: the first), the service's watchdog starts the process again, which
    then reads every input."""
    import os
    import subprocess
    import sys

    bus = Bus(bus_cfg, f"t-hang-{call}")
    publish(bus, files(24, f"hang-{call}"))
    code = f"""
import os, time
from dataclasses import replace
from pathlib import Path
from apmae.config import BusConfig
from apmae.topics import FILES
from services.bus import Bus, Processor, RunLimits
from services.runtime import run_loop
from tests.integration.test_bus import score
cfg = replace(BusConfig(), bootstrap_servers={bus_cfg.bootstrap_servers!r}, redis_url={bus_cfg.redis_url!r},
              topic_prefix={bus_cfg.topic_prefix!r}, state_dir=Path({str(bus_cfg.state_dir)!r}))
p = Processor(Bus(cfg, "t-hang"), "g-hang-{call}", [FILES], score, batch_size=8, poll_hang_s=4)
if "APMAE_STALL_RESTARTS" not in os.environ:  # the first process: its {call} hangs
    calls = []
    real = getattr(p.connect(), {call!r})
    def hang(*a, **kw):
        calls.append(1)
        if {call!r} == "close" or (len(calls) > 1 and p.processed):
            time.sleep(1e9)
        return real(*a, **kw)
    setattr(p.consumer, {call!r}, hang)
run_loop(p, "t-hang", cfg, RunLimits(idle_timeout_s=5))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "has not returned" in out.stderr and "starting again (1 of 5)" in out.stderr
    assert {m.record.sample_id for m in read_all(bus, SCORES)} >= {f.id for f in files(24, f"hang-{call}")}


class CrashBeforeCommit(Processor):
    """Dies after its outputs are flushed but before the offsets are committed."""

    def _commit(self, raws):
        raise KeyboardInterrupt("killed before commit")


def test_consumer_killed_before_commit_is_redelivered_without_duplicates(bus_cfg, redis_client):
    bus = Bus(bus_cfg, "t-crash")
    publish(bus, files(12, "crash"))
    done = DoneStore(redis_client, "g-crash")
    crashing = CrashBeforeCommit(bus, "g-crash", [FILES], score, done=done, batch_size=100)
    with pytest.raises(KeyboardInterrupt):
        crashing.run(idle_timeout_s=20)
    first = read_all(bus, SCORES)
    assert len(first) == 12  # outputs were flushed before the "crash"

    survivor = Processor(bus, "g-crash", [FILES], score, done=DoneStore(redis_client, "g-crash"))
    assert survivor.run(max_messages=12, idle_timeout_s=20) == 12  # re-delivered: nothing was committed
    out = read_all(bus, SCORES)
    ids = [m.record.id for m in out]
    assert len(ids) == 12 and len(set(ids)) == 12  # and not produced twice


def test_without_done_marks_redelivery_repeats_ids_that_consumers_can_drop(bus_cfg):
    """The control: at-least-once alone duplicates; deterministic ids make them recognisable."""
    bus = Bus(bus_cfg, "t-crash2")
    publish(bus, files(5, "c2"))
    with pytest.raises(KeyboardInterrupt):
        CrashBeforeCommit(bus, "g-c2", [FILES], score, batch_size=100).run(idle_timeout_s=20)
    Processor(bus, "g-c2", [FILES], score).run(max_messages=5, idle_timeout_s=20)
    ids = [m.record.id for m in read_all(bus, SCORES)]
    assert len(ids) == 10 and len(set(ids)) == 5


def test_dead_letters_for_malformed_messages_and_service_keeps_running(bus_cfg):
    bus = Bus(bus_cfg, "t-dlq")
    good = files(3, "dlq")
    bus.ensure_topics()
    bus.producer.send(bus.name(FILES), value=b"not an apmae message")
    bus.producer.send(bus.name(FILES), value=encode(ScoreRecord(id="x", sample_id="s", model="m", task="t",
                                                                prob_correct=0.5, actual=None,
                                                                classifier_version="v")))
    publish(bus, good)

    def picky(msgs):
        for m in msgs:
            if len(m.record.content) == 1:
                raise RuntimeError("cannot handle files of length 1")
        yield from score(msgs)

    p = Processor(bus, "g-dlq", [FILES], picky, batch_size=100)
    assert p.run(max_messages=5, idle_timeout_s=20) == 5
    dead = [m.record for m in read_all(bus, DEADLETTER)]
    reasons = sorted(d.reason for d in dead)
    assert len(dead) == 3, reasons
    assert any("bad magic" in r for r in reasons)
    assert any("schema 'score' where 'file'" in r for r in reasons)
    assert any("cannot handle files of length 1" in r for r in reasons)
    assert {d.payload for d in dead} >= {b"not an apmae message"}  # original bytes kept
    assert len(read_all(bus, SCORES)) == 2  # the good neighbours of the poison message went through


def test_replay_from_beginning_and_from_timestamp_to_topic_and_parquet(bus_cfg, tmp_path):
    from services.replay import ReplayConfig, import_parquet, replay

    bus = Bus(bus_cfg, "t-replay")
    bus.ensure_topics()
    early, late = files(6, "early"), files(4, "late")
    t0 = int(time.time() * 1000) - 60_000
    for i, r in enumerate(early):
        bus.send(Output(FILES, r), timestamp_ms=t0 + i)
    split = t0 + 30_000
    for i, r in enumerate(late):
        bus.send(Output(FILES, r), timestamp_ms=split + 1 + i)
    bus.flush()

    base = dict(vars(bus_cfg))
    full = replay(ReplayConfig(**base, topic="files", to_parquet=tmp_path / "all"), progress=False)
    assert full["read"] == 10 and full["to_parquet"] == 10
    part = replay(ReplayConfig(**base, topic="files", from_time=str(split),
                               to_topic=bus_cfg.topic_prefix + "files.replayed"), progress=False)
    assert part["read"] == 4
    from kafka import TopicPartition

    c = bus.consumer(None)
    tps = [TopicPartition(bus_cfg.topic_prefix + "files.replayed", p) for p in
           c.partitions_for_topic(bus_cfg.topic_prefix + "files.replayed")]
    c.assign(tps)
    c.seek_to_beginning()
    got = []
    deadline = time.monotonic() + 15
    while len(got) < 4 and time.monotonic() < deadline:
        for recs in c.poll(500).values():
            got += [decode(r.value, FileRecord).id for r in recs]
    c.close()
    assert sorted(got) == sorted(r.id for r in late)

    # import writes back to the declared topic each row came from (under the prefix); file
    # records aimed at the samples topic are of the wrong schema: skipped and counted
    counts = import_parquet(bus_cfg, tmp_path / "all", progress=False)
    assert counts["imported"] == 10 and counts["wrong_schema"] == 0
    assert len(list(read_range(bus, FILES))) == 20
    wrong = import_parquet(bus_cfg, tmp_path / "all", to_topic="samples", progress=False)
    assert wrong["imported"] == 0 and wrong["wrong_schema"] == 10


def test_graceful_stop_commits_what_was_done(bus_cfg):
    bus = Bus(bus_cfg, "t-stop")
    publish(bus, files(8, "stop"))
    p = Processor(bus, "g-stop", [FILES], score, batch_size=2)
    t = threading.Thread(target=p.run, kwargs={"idle_timeout_s": 30})
    t.start()
    deadline = time.monotonic() + 30
    while p.processed < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    p.stop_event.set()  # what SIGTERM does
    t.join(30)
    assert not t.is_alive()
    rest = Processor(bus, "g-stop", [FILES], score).run(idle_timeout_s=5)
    assert p.processed + rest == 8  # nothing skipped, nothing twice


def test_redis_round_trip_and_done_store(redis_client):
    redis_client.set("apmae:test:key", b"value")
    assert redis_client.get("apmae:test:key") == b"value"
    d = DoneStore(redis_client, "g-redis")
    d.mark(["a", "b"])
    assert d.seen(["a", "b", "c"]) == {"a", "b"}
    assert redis_client.ttl("apmae:done:g-redis:a") > 0


def test_dead_letter_record_schema_round_trips():
    rec = DeadLetterRecord(id="d", source_topic="files", partition=0, offset=3, service="s", reason="r",
                           payload=b"\xff\x00")
    assert decode(encode(rec), DeadLetterRecord) == rec
