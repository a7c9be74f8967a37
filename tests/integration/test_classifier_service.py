"""Classifier fit from the topics and live scoring end to end on the real broker and Redis."""

from __future__ import annotations

import random

from apmae.topics import ASSIGNMENTS, SAMPLES, SCORES, AssignmentRecord, SampleRecord
from services.bus import Bus, Output, read_range
from services.classifier import ClassifyConfig, Scorer, fit_all

LAYERS, HEADS = 3, 4


def sample(i: int, correct: bool) -> SampleRecord:
    return SampleRecord(id=f"s{i}", file_id="f", model="m", task="identifier", prompt_mode="prefix", target="x",
                        target_token=1, predicted_token=1 if correct else 2, predicted="x", correct=correct,
                        n_layers=LAYERS, n_heads=HEADS)


def assignments(i: int, correct: bool, rng: random.Random) -> list[AssignmentRecord]:
    out = []
    for layer in range(LAYERS):
        for head in range(HEADS):
            c = rng.randint(-1, 2)
            if (layer, head) == (1, 2):  # the deciding head
                c = 2 if correct else rng.choice([-1, 0])
            out.append(AssignmentRecord(id=f"a{i}-{layer}-{head}", sample_id=f"s{i}", model="m", task="identifier",
                                        layer=layer, head=head, correct=correct, cluster=c, strength=1.0,
                                        cluster_version="v1"))
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
    bus.flush()
    cfg = ClassifyConfig(**vars(bus_cfg), iterations=100, depth=4, folds=5, threads=2, out_dir=tmp_path / "rep")
    report = fit_all(cfg)
    task = report["models"]["m"]["tasks"][0]
    assert task["task"] == "identifier" and task["mean"] > 0.9 and task["baseline_mean"] <= 0.55
    assert next(iter(task["top_heads"])) == "L1H2"
    assert (tmp_path / "rep" / "shap-identifier.png").exists() and (tmp_path / "rep" / "accuracy-m.png").exists()

    # live: new samples whose assignments arrive shuffled, with duplicates, after the fit
    live = []
    for i in range(1000, 1020):
        live += assignments(i, i % 2 == 0, rng)
    live += live[:15]  # duplicates
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
    assert len(raw) == len(set(raw))  # and once each
    right = sum((scores[s].prob_correct >= 0.5) == scores[s].actual for s in live_ids)
    assert right >= 18


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
