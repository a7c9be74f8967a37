"""``apmae intervene``: do the heads the classifier names matter to the target model?

For each task in the classifier report (``apmae classify fit``), held-out inputs are built
exactly as the producer builds them, from corpus files the pipeline never saw (any file
whose id appears in the ``samples`` topic is skipped). The target model predicts them once
unchanged, then with k heads zeroed (:mod:`apmae.intervene`): the task's top-SHAP heads,
k random heads (20 draws by default) and the k most neutral heads. The change in the
correctness rate per condition, with McNemar's exact p-value on the same inputs
(:func:`apmae.intervene.paired_effect`) and the top heads' rank among the random draws
(:func:`apmae.intervene.summarise`), is written as a table (JSON) and a bar plot next to
the report.

Only heads that were mined (and so have a SHAP value) are candidates for every condition,
so the controls are drawn from the same pool as the top heads.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apmae.classify import parse_column
from apmae.config import setting
from apmae.corpus import CorpusStats, default_jdk_corpus, open_corpus
from apmae.figures import intervention_bars
from apmae.inputs import InputBuilder, ModelInput, Rejected
from apmae.intervene import as_heads, choose, paired_effect, summarise, zero_heads
from apmae.target import TargetModel, is_correct
from apmae.tasks import mine_spans, sample_spans
from apmae.topics import SAMPLES
from services.bus import Bus, Message, read_range
from services.producer import ProducerConfig

log = logging.getLogger("apmae.intervene")


@dataclass(frozen=True)
class InterveneConfig(ProducerConfig):
    corpus: str = setting("", "Held-out corpus: directory, archive or Heap shard (default: the JDK's src.zip)")
    skip_files: int = setting(0, "Corpus files to skip before drawing held-out inputs")
    max_files: int = setting(400, "Corpus files to read at most")
    per_task: int = setting(40, "Held-out inputs per task")
    k: int = setting(5, "Heads zeroed per condition")
    random_draws: int = setting(20, "Random-head draws (the control's spread; 20+ for its empirical p-value)")
    report: Path = setting(Path(""), "Classifier report.json (default: <artifacts>/classifier/report.json)")
    out_dir: Path = setting(Path(""), "Where the table and plot go (default: beside the report)")

    @property
    def report_path(self) -> Path:
        return self.report if str(self.report) not in ("", ".") else self.artifacts_dir / "classifier" / "report.json"


def held_out_inputs(cfg: InterveneConfig, builder: InputBuilder, tasks: set[str], seen: set[str]) -> dict[str, list[ModelInput]]:
    """Up to ``per_task`` inputs per task from files not in ``seen`` (ids of files already used)."""
    path = cfg.corpus or default_jdk_corpus()
    if path is None:
        raise SystemExit("no held-out corpus: pass --corpus (no JDK src.zip found)")
    out: dict[str, list[ModelInput]] = defaultdict(list)
    stats = CorpusStats()
    for i, f in enumerate(open_corpus(path, stats)):
        if i < cfg.skip_files or f.id in seen:
            continue
        if i >= cfg.skip_files + cfg.max_files or all(len(out[t]) >= cfg.per_task for t in tasks):
            break
        tf = builder.tokenize(f.content)
        res = mine_spans(f.content.encode("utf-8"), include_plain_assign=cfg.include_plain_assign)
        for span in sample_spans(res, cfg.mining.spans_per_task, f"{cfg.seed}:held-out:{f.path}"):
            if span.task in tasks and len(out[span.task]) < cfg.per_task:
                x = builder.build(tf, span)
                if not isinstance(x, Rejected):
                    out[span.task].append(x)
    return dict(out)


def correctness(lm: TargetModel, xs: list[ModelInput], batch: int) -> np.ndarray:
    """(N,) bool: the greedy next token equals the span's first token."""
    got = []
    for i in range(0, len(xs), batch):
        res = lm.run(xs[i:i + batch], heads=None)
        got += [bool(is_correct(int(p), x)) for p, x in zip(res.predicted, xs[i:i + batch], strict=True)]
    return np.array(got, dtype=bool)


def run(cfg: InterveneConfig, lm: TargetModel | None = None) -> dict:
    report = json.loads(cfg.report_path.read_text())
    lm = lm or TargetModel.load(cfg.model, cfg.model_cache, cfg.device or None, cfg.dtype or None, cfg.revision or None)
    entry = report["models"].get(lm.name)
    if entry is None:
        raise SystemExit(f"{cfg.report_path} has no classifiers for {lm.name} (has {sorted(report['models'])})")
    importance = {t["task"]: {parse_column(c): v for c, v in t["importance"].items()}
                  for t in entry["tasks"] if "importance" in t}
    if not importance:
        raise SystemExit(f"no fitted task in {cfg.report_path} carries head importances: rerun apmae classify fit")
    builder = cfg.input_builder(lm.tok)
    seen = {m.record.file_id for m in read_range(Bus(cfg, "intervene"), SAMPLES) if isinstance(m, Message)}
    inputs = held_out_inputs(cfg, builder, set(importance), seen)

    rows = []
    for task, imp in sorted(importance.items()):
        xs = inputs.get(task, [])
        if not xs:
            rows.append({"task": task, "condition": "none", "n": 0, "skipped": "no held-out inputs"})
            continue
        base = correctness(lm, xs, cfg.batch_size)
        rows.append({"task": task, "condition": "none", "n": len(xs), "heads": [], "correct_rate": float(base.mean()),
                     "delta": 0.0, "flipped": 0})
        draws = [("top", 0), ("neutral", 0)] + [("random", d) for d in range(cfg.random_draws)]
        for condition, seed in draws:
            pairs = choose(imp, min(cfg.k, len(imp)), condition, seed + cfg.seed)
            with zero_heads(lm.model, as_heads(pairs)):
                got = correctness(lm, xs, cfg.batch_size)
            rows.append({"task": task, "condition": condition, "draw": seed,
                         "heads": [f"L{la}H{h}" for la, h in pairs], **paired_effect(base, got)})
        log.info("%s: %s", task, [(r["condition"], round(r["delta"], 3)) for r in rows if r["task"] == task])
    summary = summarise(rows)
    out = cfg.out_dir if str(cfg.out_dir) not in ("", ".") else cfg.report_path.parent
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": lm.name, "k": cfg.k, "random_draws": cfg.random_draws, "rows": rows, "summary": summary}
    (out / "intervene.json").write_text(json.dumps(result, indent=2))
    intervention_bars(summary, out / "intervene.png", f"{lm.name}: correctness change with {cfg.k} heads zeroed")
    result["figure"] = str(out / "intervene.png")
    return result
