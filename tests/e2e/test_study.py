"""``apmae study`` end to end at smoke size (the local SmolLM2 on a few JDK files, minutes), and
the study's pure pieces: the budget split, the paired reconstruction numbers, the log-scaling
verdict. The smoke run must write every key of numbers.json, labelled ``"smoke": true``."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from apmae.classify import ClassifierConfig
from apmae.cluster import ClusterConfig
from apmae.config import from_flat
from apmae.evaluate import paired_reconstruction
from apmae.mining import MiningConfig
from apmae.recipe import TrainingConfig
from apmae.split import Split
from services.study import SHARES, Study, StudyConfig
from services.study_numbers import log_scaling_numbers


# -- pure pieces (no servers) ---------------------------------------------------------------------
def test_each_stage_gets_its_share_of_what_is_left(tmp_path):
    s = Study(from_flat(StudyConfig, state_dir=tmp_path, budget_minutes=100))
    assert s.allot("produce") == pytest.approx(6000 * SHARES["produce"] / sum(SHARES.values()))
    # produce finished early: its unused time goes to the stages after it, in proportion
    s.done["produce"], s.timings["produce"] = {}, 600.0
    rest = sum(v for k, v in SHARES.items() if k != "produce")
    assert s.allot("train") == pytest.approx(5400 * SHARES["train"] / rest)


def test_paired_reconstruction_counts_samples_and_bounds_the_ratio():
    from apmae.mae import APMAE, variant
    from services.study import synthetic_patterns

    torch.manual_seed(0)
    model = APMAE(variant("tiny", pattern_size=64, patch_size=16))
    pats = synthetic_patterns(80, 64)
    ids = [f"s{i // 4}" for i in range(80)]  # 20 samples, 4 heads each
    r = paired_reconstruction(model, pats, ids)
    assert r["split"] == "by_sample" and r["n_samples"] + r["baseline_fit_samples"] == 20
    assert r["n_patterns"] == 4 * r["n_samples"]
    lo, hi = r["ratio_ci95"]
    assert lo <= r["ratio"] <= hi and r["apmae"]["n_samples"] == r["n_samples"]
    assert len(r["mean_patch_baseline"]["ci95"]) == 2


@pytest.mark.parametrize("log_ci,raw_ci,agrees", [((0.4, 0.5), (0.8, 0.9), True), ((0.8, 0.9), (0.4, 0.5), False),
                                                  ((0.4, 0.8), (0.6, 0.9), None)])
def test_the_log_scaling_sentence_follows_the_intervals(log_ci, raw_ci, agrees):
    run = lambda ci: {"ratio": float(np.mean(ci)), "ratio_ci95": list(ci), "n_samples": 50}  # noqa: E731
    out = log_scaling_numbers({"runs": {"ablation-log": run(log_ci), "ablation-raw": run(raw_ci)}}, 100)
    assert out["agrees_with_paper"] is agrees and "n = 50" in out["sentence"]
    assert ("neither run beats" in out["sentence"]) == out["neither_beats_baseline"]
    assert ("agrees with" in out["sentence"]) == (agrees is True)


# -- the smoke run -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from apmae.corpus import default_jdk_corpus
    from services.infra import InfraConfig, down, free_port

    if default_jdk_corpus() is None:
        pytest.skip("no JDK src.zip: the smoke run mines real Java files")
    state = tmp_path_factory.mktemp("study")
    # the in-memory broker, on ports of its own (another engineer's durable broker may hold the S3 port)
    servers = InfraConfig(state_dir=state, kafka_port=free_port(), redis_port=free_port(),
                          prometheus_port=free_port(), ephemeral=True, s3_port=free_port())
    cfg = StudyConfig(infra=servers, out_dir=state / "out", budget_minutes=4, files=8, chunk_files=4,
                      live_files=1, skip_files=40, ablation_steps=10,
                      mining=MiningConfig(mine_layers="29", mine_per_task=40, spans_per_task=4, random_per_file=6,
                                          forward_full_tasks=False, split=Split(held_out_files=0.2)),
                      train=TrainingConfig(variant="tiny", steps=0, epochs=8, batch_size=16, lr=1e-3),
                      cluster=ClusterConfig(min_cluster_size=5, min_samples=3),
                      classifier=ClassifierConfig(iterations=50, folds=3), eval_samples=60, eval_heads=4,
                      intervene_per_task=2, intervene_k=3, intervene_draws=20, umap_heads=2)
    s = Study(cfg)
    t0 = time.perf_counter()
    s.run()
    s.wall_s = time.perf_counter() - t0
    yield s
    down(s.infra)


def test_every_key_is_written_and_labelled_smoke(study):
    out = study.cfg.out_dir
    n = json.loads((out / "numbers.json").read_text())
    assert n["smoke"] is True and "SMOKE" in n["note"]
    for key in ("reconstruction", "log_scaling", "diagnosis", "clusters_per_head", "tasks", "intervention", "live",
                "cross_eval", "timings_s", "targets"):
        assert key in n, key
    r = n["reconstruction"]
    assert r["split"] == "by_sample" and r["n_samples"] > 0
    assert r["apmae"]["mean"] > 0 and r["mean_patch_baseline"]["mean"] > 0 and len(r["ratio_ci95"]) == 2
    assert r["apmae"]["ci95"] and r["mean_patch_baseline"]["ci95"]
    assert "sentence" in n["log_scaling"] and n["log_scaling"]["steps"] == 10
    c = n["clusters_per_head"]
    assert c["n_heads"] == study.done["produce"]["mined_heads"] and c["distribution"]
    assert all("mean_pairwise_cosine" in h for h in c["heads"].values())
    from apmae.tasks import LABELLED_TASKS

    assert set(n["tasks"]) == set(LABELLED_TASKS) and n["targets"]["labelled_tasks"] == len(LABELLED_TASKS)
    for task, row in n["tasks"].items():
        assert row["chance_level"] == 0.5 and "n_balanced" in row, task
        if "cv_accuracy" in row:
            lo, hi = row["ci95"]
            assert 0 <= lo <= row["cv_accuracy"] <= hi <= 1
    assert n["live"]["in_sample"] is False and "n" in n["live"]
    table = n["cross_eval"]["table"]
    assert set(table) == {"main", "ablation-log", "ablation-raw"}
    cell = next(iter(table["main"].values()))
    assert "baseline" in cell and "n_samples" in cell
    iv = n["intervention"]
    assert "tasks" in iv or "skipped" in iv
    if "tasks" in iv:
        assert iv["random_draws"] >= 20 and all("top_p_value" in t for t in iv["tasks"])
    readme = (out / "README.md").read_text()
    assert "SMOKE RUN" in readme and "numbers.json" in readme
    for f in n["figures"]:
        assert (out / f).read_bytes()[:4] == b"\x89PNG"
    assert {"figure1.png", "reconstruction.png", "clusters.png"} <= set(n["figures"])
    print("smoke stage timings (s):", n["timings_s"], "wall", round(study.wall_s, 1))


def test_training_samples_are_never_mined(study):
    from apmae.topics import PATTERNS_MINE, PATTERNS_TRAIN
    from services.bus import Bus, Message, read_range

    bus = Bus(study.bus)
    train = {m.record.sample_id for m in read_range(bus, PATTERNS_TRAIN) if isinstance(m, Message)}
    mine = {m.record.sample_id for m in read_range(bus, PATTERNS_MINE) if isinstance(m, Message)}
    assert train and mine and not train & mine


def test_a_rerun_continues_instead_of_starting_over(study):
    before = json.loads(study.stages_file.read_text())
    again = Study(study.cfg)
    again.infra = study.infra
    t0 = time.perf_counter()
    done = again.run()
    assert time.perf_counter() - t0 < 30
    for stage in study.stages[1:]:
        assert done["_timings"][stage] == before["_timings"][stage], stage  # not run again


def test_an_encode_stage_that_reads_nothing_fails_instead_of_recording_zero(tmp_path, monkeypatch):
    from services.demo import Demo

    s = Study(from_flat(StudyConfig, state_dir=tmp_path, ephemeral=True))
    s.done["produce"] = {"mined": {"identifier": {"correct": 3, "incorrect": 2}}}
    monkeypatch.setattr(Demo, "stage_encode", lambda self: {"embedded": 0})
    with pytest.raises(RuntimeError, match="encode embedded nothing although produce mined 5 samples"):
        s.stage_encode()
    monkeypatch.setattr(Demo, "stage_encode", lambda self: {"embedded": 7})
    assert s.stage_encode() == {"embedded": 7}


def test_the_main_run_is_the_log_arm_only_when_the_raw_arm_gets_its_steps(tmp_path):
    """The log-scaling ablation at the main run's scale: the main run is its log arm when the
    raw arm is trained for as many steps; at fewer steps both arms are trained anew."""
    s = Study(from_flat(StudyConfig, state_dir=tmp_path, ephemeral=True))
    s.plan.update(train_steps=900, ablation_steps=900)
    assert s.ablation_names() == {"log": "study", "raw": "study-ablation-raw"}
    s.plan["ablation_steps"] = 300
    assert s.ablation_names() == {"log": "study-ablation-log", "raw": "study-ablation-raw"}


def test_a_diagnosis_says_which_change_helps_only_where_the_cis_are_apart():
    from services.study_numbers import diagnosis_numbers

    def run(ci, change=None):
        return {"ratio": sum(ci) / 2, "ratio_ci95": ci, "n_samples": 300, "change": change}

    dg = {"steps": 200, "main_steps": 2000,
          "runs": {"reference": run([0.80, 0.90]), "lr_x3": run([0.60, 0.70], {"lr": 3e-3}),
                   "lr_x0.3": run([0.85, 0.95], {"lr": 3e-4}), "no_shuffle": run([0.95, 1.05], {"shuffle_window": 32})}}
    out = diagnosis_numbers(dg, run([0.70, 0.80]))
    assert out["helps"] == ["lr_x3"]
    assert out["runs"]["lr_x0.3"]["effect"].startswith("no difference")
    assert out["runs"]["no_shuffle"]["effect"].startswith("worse")
    assert "at 200 steps" in out["steps_trend"] and "at 2000 steps" in out["steps_trend"]
    assert diagnosis_numbers({"skipped": "the target is reached"}, {}) == {"skipped": "the target is reached"}


def test_each_diagnosis_run_changes_one_field_of_the_recipe():
    recipe = TrainingConfig(lr=1e-3, batch_size=32, patch_size=32)
    changes = {label: Study.diagnosis_change(label, recipe) for label in Study.DIAGNOSES}
    assert changes["reference"] == {} and changes["patch_64"] == {"patch_size": 64}
    assert changes["lr_x3"]["lr"] == pytest.approx(3e-3) and changes["lr_x0.3"]["lr"] == pytest.approx(3e-4)
    assert changes["no_shuffle"] == {"shuffle_window": 32}  # a window of one batch: no mixing
    scaled = Study.diagnosis_change("lr_x3", TrainingConfig(lr=0.0, batch_size=50))
    assert scaled["lr"] == pytest.approx(3 * 1.5e-4)  # lr 0 means the scaled rate, then the factor
