"""``apmae eval``: score AP-MAE checkpoints on patterns from a topic, a replay range or Parquet.

    apmae eval --checkpoint .apmae/artifacts/trainer/apmae/step-00001000 \\
               --source topic:patterns.mine --limit 200 --heads-per-sample 5 --figure fig1.png

With several ``--checkpoint`` values the output is the paper's Table 2: one row per
checkpoint, one column per target model found in the patterns (the ``model`` field).
``--limit`` counts samples (all the heads of one sample are one unit, not independent
patterns), and ``n`` in the table is in samples (:class:`apmae.evaluate.SampleSelection`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import torch

from apmae.codec import BadPattern, decode_pattern
from apmae.config import BusConfig
from apmae.messages import InvalidMessage, decode
from apmae.topics import PatternRecord, topic
from services.bus import Bus, Message, read_range


def load_patterns(cfg: BusConfig, source: str, limit: int = 0, size: int = 256, per_sample: int = 0,
                  seed: int = 0) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """``topic:<name>`` or ``parquet:<dir or file>`` -> {target model: ((N, S, S) patterns, sample ids)}.

    ``limit``: samples per target model (0 = all), ``per_sample``: patterns (heads) per
    sample (0 = all), both an unbiased hash-based draw (:class:`apmae.evaluate.SampleSelection`);
    the whole range is read. Undecodable records and NaN/Inf patterns are skipped and counted.
    """
    from apmae.evaluate import SampleSelection

    kind, _, where = source.partition(":")
    pick = SampleSelection(limit, per_sample, seed)
    bad = 0

    def add(rec: PatternRecord) -> None:
        nonlocal bad
        if rec.size != size or not pick.wants(rec.model, rec.sample_id, rec.id):
            return
        try:
            pick.offer(rec.model, rec.sample_id, rec.id,
                       torch.from_numpy(decode_pattern(rec.payload, rec.size, rec.dtype)))
        except BadPattern:
            bad += 1

    if kind == "topic":
        for m in read_range(Bus(cfg, "eval"), topic(where)):
            if isinstance(m, Message):
                add(m.record)
            else:
                bad += 1
    elif kind == "parquet":
        p = Path(where)
        for f in sorted(p.glob("*.parquet")) if p.is_dir() else [p]:
            for value in pq.read_table(f, columns=["value"]).column("value").to_pylist():
                try:
                    add(decode(value, PatternRecord))
                except InvalidMessage:
                    bad += 1
    else:
        raise ValueError(f"source {source!r}: use topic:<name> or parquet:<path>")
    if bad:
        print(f"skipped {bad} undecodable messages or non-finite patterns in {source}")
    return {k: (torch.stack(items), ids) for k, (items, ids) in pick.result().items()}


def run(cfg: BusConfig, checkpoints: list[Path], source: str, limit: int, figure: Path | None, seed: int = 0,
        per_sample: int = 0) -> dict:
    """Table 2 over ``limit`` samples per target model (``per_sample`` heads each; 0 = all)."""
    from apmae import evaluate as E
    from apmae.mae import from_pretrained

    # rows named by run and step (".../trainer/<run>/step-N"); the full path is ambiguous when cut
    models = {_label(c, checkpoints): from_pretrained(c)[0] for c in checkpoints}
    size = next(iter(models.values())).cfg.pattern_size
    loaded = load_patterns(cfg, source, limit, size, per_sample, seed)
    if not loaded:
        raise SystemExit(f"no {size}x{size} patterns found in {source}")
    sources = {k: v[0] for k, v in loaded.items()}
    matrix = E.cross_evaluation(models, sources, seed, {k: v[1] for k, v in loaded.items()})
    print(E.format_table(matrix))
    if figure:
        first_model = next(iter(models.values()))
        E.figure1(first_model, next(iter(sources.values()))[0], figure)
        print(f"figure 1 -> {figure}")
    return matrix


def _label(c: Path, all_: list[Path]) -> str:
    short = f"{Path(c).parent.name}/{Path(c).name}"
    return short if sum(f"{Path(o).parent.name}/{Path(o).name}" == short for o in all_) == 1 else str(c)


def dump(matrix: dict) -> str:
    return json.dumps(matrix, indent=2)
