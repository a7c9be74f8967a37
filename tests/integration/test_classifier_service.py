"""Classifier fit from the topics and live scoring end to end on the real broker and Redis."""

from __future__ import annotations

import random

import pytest

from apmae.classify import ClassifierConfig
from apmae.topics import ASSIGNMENTS, SAMPLES, SCORES, AssignmentRecord, SampleRecord
from services.bus import Bus, Output, read_range
from services.classifier import ClassifyConfig, Scorer, fit_all

LAYERS, HEADS = 3, 4


def sample(i: int, correct: bool) -> SampleRecord:
    return SampleRecord(id=f"s{i}", file_id=f"f{i // 4}", model="m", task="identifier", prompt_mode="prefix", target="x",
                        target_token=1, predicted_token=1 if correct else 2, predicted="x", correct=correct,
                        n_layers=LAYERS, n_heads=HEADS)


def assignments(i: int, correct: bool, rng: random.Random, version: str = "v1") -> list[AssignmentRecord]:
    out = []
    for layer in range(LAYERS):
        for head in range(HEADS):
            c = rng.randint(-1, 2)
            if (layer, head) == (1, 2):  # the deciding head
                c = 2 if correct else rng.choice([-1, 0])
            out.append(AssignmentRecord(id=f"a{i}-{layer}-{head}-{version}", sample_id=f"s{i}", model="m",
                                        task="identifier", layer=layer, head=head, correct=correct, cluster=c,
                                        strength=1.0, cluster_version=version))
    return out


def test_fit_then_live_scoring_with_out_of_order_and_duplicate_assignments(bus_cfg, tmp_path):
    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    rng = random.Random(0)
    for i in range(160):
        correct = i % 2 == 0
        bus.send(Output(SAMPLES, sample(i, correct)))
        for a in assignments(i, correct, rng):
            bus.send(Output(ASSIGNMENTS, a))
    for i in range(500, 600):  # candidates the model got wrong that were never mined (no assignments)
        bus.send(Output(SAMPLES, sample(i, False)))
    bus.flush()
    cfg = ClassifyConfig(**vars(bus_cfg), classifier=ClassifierConfig(iterations=100, depth=4, folds=5, threads=2),
                         out_dir=tmp_path / "rep")
    report = fit_all(cfg)
    task = report["models"]["m"]["tasks"][0]
    assert task["task"] == "identifier" and task["mean"] > 0.9 and task["chance_level"] == 0.5
    assert task["n_balanced"] == 160 and task["ci95"][0] > 0.8
    # the model's accuracy is over all 260 candidates (80 right), not the balanced rows' 0.5
    assert task["llm_correct"]["n"] == 260 and task["llm_correct_rate"] == 80 / 260
    assert set(report["fit_file_ids"]) == {f"f{i // 4}" for i in range(160)}
    assert next(iter(task["top_heads"])) == "L1H2"
    assert (tmp_path / "rep" / "shap-identifier.png").exists() and (tmp_path / "rep" / "accuracy-m.png").exists()

    # live: new samples whose assignments arrive shuffled, with duplicates, after the fit
    live = []
    for i in range(1000, 1020):
        live += assignments(i, i % 2 == 0, rng)
    live += live[:15]  # duplicates
    live += assignments(1000, True, rng, version="v2")  # another cluster version: never mixed into v1 rows
    live += assignments(1001, False, rng, version="v2")[:6]
    rng.shuffle(live)
    for a in live:
        bus.send(Output(ASSIGNMENTS, a))
    bus.flush()
    scorer = Scorer(cfg)
    scorer.processor().run(idle_timeout_s=8)
    scores = {m.record.sample_id: m.record for m in read_range(bus, SCORES)}
    live_ids = {f"s{i}" for i in range(1000, 1020)}
    assert live_ids <= set(scores)  # every complete live row scored
    raw = [m.record.sample_id for m in read_range(bus, SCORES)]
    assert len(raw) == len(set(raw))  # and once each (the v2 row was not scored by the v1 classifier)
    assert all(scores[s].cluster_version == "v1" for s in scores)
    right = sum((scores[s].prob_correct >= 0.5) == scores[s].actual for s in live_ids)
    assert right >= 18
    # the scorer's group starts at the earliest offset, so it also scored the rows the classifier was
    # fit on: those are marked in sample, the new ones are not
    assert not any(scores[s].in_sample for s in live_ids)
    assert all(scores[f"s{i}"].in_sample for i in range(160))
    from apmae.scoring import live_accuracy

    file_of = {m.record.id: m.record.file_id for m in read_range(bus, SAMPLES)}
    file_of.update({s: f"live{s}" for s in live_ids})
    acc = live_accuracy(scores.values(), file_of, set(report["fit_file_ids"]))
    assert acc["n"] == 20 and acc["left_out_seen_files"] == 160 and acc["in_sample"] is False


def test_partial_rows_are_bounded_and_a_score_waits_for_its_flush(bus_cfg, tmp_path):
    from services.bus import Message

    cfg = ClassifyConfig(**vars(bus_cfg), max_partial_rows=5, out_dir=tmp_path / "rep")
    scorer = Scorer(cfg)
    rng = random.Random(1)
    msgs = [Message("assignments", 0, i, 0, None, b"", a)
            for i in range(2000, 2010) for a in assignments(i, True, rng)[:3]]  # 3 of 12 heads: never complete
    scorer.handle(msgs)
    assert scorer.redis.zcard(f"{scorer.pfx}index") == 5  # the 5 oldest were dropped and counted
    from services.classifier import EXPIRED

    assert EXPIRED.labels("m", "queue full")._value.get() >= 5
    assert scorer.scored == []  # nothing is marked scored before its score is flushed


def test_a_failed_flush_never_marks_its_rows_scored(bus_cfg, tmp_path, monkeypatch):
    """Rows scored in a batch whose flush failed are scored again on the retry, whatever the
    next successful batch holds. Before, the failed batch's rows stayed queued for the "scored"
    mark, the next batch's flush marked them, and their redelivered assignments were dropped
    (the fault matrix's scorer x broker restart lost 194 of 1620)."""
    from types import SimpleNamespace

    from apmae.messages import encode
    from services.bus import Retryable
    from tests.integration.test_faults import fit_labelled

    bus = Bus(bus_cfg, "test")
    bus.ensure_topics()
    rng = fit_labelled(bus, bus_cfg, tmp_path / "rep", ClassifierConfig(iterations=30, depth=3, folds=3, threads=1))
    scorer = Scorer(ClassifyConfig(**vars(bus_cfg), out_dir=tmp_path / "rep"))
    proc = scorer.processor()
    topic = scorer.bus.name(ASSIGNMENTS)

    def raws(first: int, n: int, offset: int):
        recs = [a for i in range(first, first + n) for a in assignments(i, i % 2 == 0, rng)]
        return [SimpleNamespace(topic=topic, partition=0, offset=offset + k, timestamp=0, key=None, value=encode(a))
                for k, a in enumerate(recs)]

    a, b = raws(5000, 5, 0), raws(6000, 5, 1000)
    with monkeypatch.context() as m:  # batch A's scores never become durable: its flush fails
        m.setattr(scorer.bus, "send", lambda out, timestamp_ms=None: None)
        m.setattr(scorer.bus, "flush", lambda timeout=60.0: (_ for _ in ()).throw(Retryable("acks lost")))
        with pytest.raises(Retryable):
            proc.process_batch(a)
    proc.process_batch(b)  # the next batch succeeds (a rebalance handed it other partitions)
    proc.process_batch(a)  # A redelivered
    scored = {m.record.sample_id for m in read_range(bus, SCORES)}
    assert {f"s{i}" for i in [*range(5000, 5005), *range(6000, 6005)]} <= scored
