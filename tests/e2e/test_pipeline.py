"""The whole pipeline end to end, as `apmae demo` runs it, on the local default model and
the real broker, Redis and Prometheus; then every Grafana panel's PromQL must return data."""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from apmae.classify import ClassifierConfig
from apmae.cluster import ClusterConfig
from apmae.mining import MiningConfig
from apmae.recipe import TrainingConfig
from apmae.topics import (
    ALL_TOPICS,
    ASSIGNMENTS,
    EMBEDDINGS,
    FILES,
    PATTERNS_MINE,
    PATTERNS_TRAIN,
    SAMPLES,
    SCORES,
)
from services.bus import Bus, read_range
from services.demo import Demo, DemoConfig
from services.infra import InfraConfig, down, free_port

ROOT = Path(__file__).resolve().parents[2]
SECRET = f"pw-{uuid.uuid4().hex}"  # the demo's Redis requires it; it must never reach a log or a file


def promql(url: str, expr: str) -> list:
    q = f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(q, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from apmae.corpus import default_jdk_corpus

    state = tmp_path_factory.mktemp("demo")
    corpus = default_jdk_corpus()
    if corpus is None:  # no JDK: a generated corpus of small distinct classes
        from tests.conftest import java_files

        corpus = state / "corpus"
        corpus.mkdir()
        for f in java_files(12, "e2e"):
            (corpus / f.path).write_text(f.content * 2)
    # every server on a free port, the durable broker's local S3 server too (4568 may be taken)
    servers = InfraConfig(state_dir=state, kafka_port=free_port(), redis_port=free_port(),
                          prometheus_port=free_port(), redis_password=SECRET, scrape_interval="1s", s3_port=free_port())
    cfg = DemoConfig(infra=servers, corpus=str(corpus), files=6, live_files=2, skip_files=40,
                     mining=MiningConfig(mine_layers="0,29", mine_per_task=40, spans_per_task=4, random_per_file=6),
                     train=TrainingConfig(variant="tiny", steps=20, batch_size=16, lr=1e-3),
                     cluster=ClusterConfig(min_cluster_size=5, min_samples=3),
                     classifier=ClassifierConfig(iterations=60, folds=5),
                     intervene_per_task=4, intervene_k=3)
    d = Demo(cfg)
    records = LogRecords()
    root = logging.getLogger()
    level, root.level = root.level, logging.INFO
    root.addHandler(records)
    try:
        d.run()
    finally:
        root.removeHandler(records)
        root.setLevel(level)
    d.log_lines = records.lines
    yield d
    down(d.infra)


class LogRecords(logging.Handler):
    """Every log line of the demo run (INFO and up, all loggers), for the secrets check."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_every_topic_received_what_the_next_stage_consumed(demo):
    bus = Bus(demo.bus)
    count = {t.name: len({m.record.id for m in read_range(bus, t)}) for t in
             (FILES, SAMPLES, PATTERNS_TRAIN, PATTERNS_MINE, EMBEDDINGS, ASSIGNMENTS, SCORES)}
    done = demo.done
    assert count["files"] == 6 + 2
    assert count["samples"] > 50
    assert done["train"]["patterns"] > 0 and done["train"]["patterns"] <= count["patterns.train"]
    assert count["embeddings"] == count["patterns.mine"]  # every mined pattern was embedded once
    fitted = {m.record.id.split("#")[0] for m in read_range(bus, ASSIGNMENTS)}
    embedded = {m.record.id: (m.partition, m.offset) for m in read_range(bus, EMBEDDINGS)}
    unassigned = sorted(embedded[i] for i in set(embedded) - fitted)
    # batch fit + live assignment cover every embedding
    assert not unassigned, (f"{len(unassigned)} embeddings never assigned, at (partition, offset) "
                            f"{unassigned[:40]}; live stage: {demo.done['live']}")
    assert fitted == set(embedded)
    assert count["scores"] > 0
    models = done["classify"]["models"]
    assert any("mean" in t for m in models.values() for t in m["tasks"])
    assert {t.name for t in ALL_TOPICS} >= set(count)


def test_report_was_written(demo):
    path = Path(demo.done["report"]["path"])
    page = path.read_text()
    for img in ("figure1.png", "figure2.png", "figure3.png", "loss.png"):
        assert img in page and (path.parent / img).read_bytes()[:4] == b"\x89PNG"
    numbers = json.loads((path.parent / "numbers.json").read_text())
    assert numbers["reconstruction"]["apmae"]["n"] > 0
    # Table 2 with its baseline column, n in samples; the loss curve of every training step
    (t2,) = numbers["table2"]
    assert t2["n_samples"] == numbers["reconstruction"]["apmae"]["n"] and t2["baseline"] > 0
    steps = demo.done["train"]["step"]
    assert "Table 2" in page and numbers["training_loss"]["steps"] == steps
    assert numbers["training_loss"]["points"] == steps  # short runs log every step
    # the head intervention ran on held-out inputs for every task with a classifier
    iv = numbers["intervene"]["summary"]
    assert iv and all(r["n"] > 0 and -1 <= r["top"] <= 1 for r in iv)
    assert "intervene.png" in page and (path.parent / "intervene.png").read_bytes()[:4] == b"\x89PNG"
    # layout: a table of contents linking every section, n with the numbers, the UMAP scatter,
    # the calibration section, and the warning exactly when AP-MAE does not beat its baseline
    import re

    anchors = re.findall(r"<li><a href='#([\w-]+)'>", page)
    assert len(anchors) >= 8 and all(f"<section id='{a}'>" in page for a in anchors)
    assert "umap.png" in page and (path.parent / "umap.png").read_bytes()[:4] == b"\x89PNG"
    assert "calibration" in anchors and ("calibration.png" in page or "No out-of-sample live score" in page)
    rec = numbers["reconstruction"]
    loses = rec["apmae_minus_baseline_ci95"][0] >= 0 or rec["ratio_apmae_to_baseline"] >= 1
    assert ("AP-MAE does <b>not</b> beat its baseline" in page) == loses
    assert page.count("n = ") >= 8


def test_the_redis_password_is_in_no_log_or_file(demo):
    """Every service connected with it; no log line, saved config, report or artifact holds it."""
    leaks = [str(p) for p in demo.cfg.state_dir.rglob("*") if p.is_file() and p.stat().st_size < 50 << 20
             and SECRET.encode() in p.read_bytes()]
    assert len(demo.log_lines) > 10  # the run did log (kafka clients, services)
    assert not leaks and not [line for line in demo.log_lines if SECRET in line], leaks


def test_every_dashboard_panel_returns_data(demo):
    """Each panel's PromQL, with Grafana's variables at "All" (and each variable's own query),
    returns series from the demo's live metrics; the dashboards are then drawn from the same
    queries (matplotlib: Grafana is not installable here). APMAE_DASHBOARD_SHOTS=<dir> keeps
    the PNGs (docs/dashboards/ holds a committed set)."""
    import os
    import shutil

    from services.dashboards import expand, render_all, variable_values

    url = demo.infra.prometheus_url
    time.sleep(3)  # one more scrape after the last stage
    empty = []
    for board in sorted((ROOT / "deploy/grafana/dashboards").glob("*.json")):
        d = json.loads(board.read_text())
        for var in d["templating"]["list"]:
            if not variable_values(url, var):
                empty.append(f"{board.stem}: variable ${var['name']}: {var['definition']}")
        for panel in d["panels"]:
            for target in panel["targets"]:
                if not promql(url, expand(target["expr"])):
                    empty.append(f"{board.stem}: {panel['title']}: {target['expr']}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    shots = demo.cfg.state_dir / "dashboards"
    drawn = render_all(url, shots, minutes=20)
    assert all(n > 0 for board in drawn.values() for n in board.values()), drawn
    assert sorted(p.name for p in shots.glob("*.png")) == ["clusters.png", "correctness.png", "pipeline.png"]
    if os.environ.get("APMAE_DASHBOARD_SHOTS"):
        shutil.copytree(shots, os.environ["APMAE_DASHBOARD_SHOTS"], dirs_exist_ok=True)
