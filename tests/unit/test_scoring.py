"""Live scoring: in-sample scores are never an accuracy; live accuracy is on unseen files."""

from __future__ import annotations

from apmae.scoring import RollingScore, live_accuracy
from apmae.topics import ScoreRecord


def score(i: int, p: float, actual: bool | None, in_sample: bool | None = False) -> ScoreRecord:
    return ScoreRecord(id=f"sc{i}", sample_id=f"s{i}", model="m", task="identifier", prob_correct=p, actual=actual,
                       classifier_version="c", cluster_version="v", in_sample=in_sample)


def test_rolling_accuracy_leaves_out_in_sample_and_unlabelled_scores():
    r = RollingScore(window=3)
    assert r.observe(0.9, True, in_sample=True) is None and r.in_sample == 1  # the fit row: no accuracy
    assert r.observe(0.9, None, in_sample=False) is None  # noise: no truth
    assert r.observe(0.9, False, False)["accuracy"] == 0.0
    got = r.observe(0.8, True, False)
    assert got["accuracy"] == 0.5 and got["n"] == 2 and abs(got["brier"] - (0.81 + 0.04) / 2) < 1e-12
    for _ in range(3):
        got = r.observe(0.2, False, False)
    assert got == {"accuracy": 1.0, "brier": 0.04000000000000001, "n": 3}  # a window of 3


def test_live_accuracy_counts_only_files_the_classifier_never_saw():
    # the scorer scored its own training rows (files f0, f1: always right) and new files (f2, f3)
    scores = [score(i, 0.9, True, in_sample=True) for i in range(8)]
    scores += [score(i, 0.9, i % 2 == 0) for i in range(8, 12)]
    scores += [score(12, 0.9, True), score(13, 0.9, None)]  # s12's file unknown; s13 unlabelled
    file_of = {f"s{i}": f"f{i // 4}" for i in range(12)} | {"s13": "f3"}
    got = live_accuracy(scores + scores[8:10], file_of, fit_files={"f0", "f1"})  # duplicates counted once
    assert got["accuracy"] == 0.5 and got["n"] == 4 and got["in_sample"] is False and got["files"] == 1
    assert got["left_out_seen_files"] == 8 and got["left_out_unknown_file"] == 1
    assert 0 <= got["ci95"][0] < 0.5 < got["ci95"][1] <= 1
    # in sample it would have read 10/12: what the demo reported as "live accuracy"
    # a sample from an unseen file that the classifier was nevertheless fit on is still in sample
    assert live_accuracy([score(20, 0.9, True, in_sample=True)], {"s20": "f9"}, set())["n"] == 0
