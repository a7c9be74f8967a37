"""The paper's Table 2 on this machine: one AP-MAE per target model, each scored on every
target model's held-out patterns.

Two target models are available offline: SmolLM2-135M (the local default, 30 layers x 9
heads) and the tiny randomly initialised StarCoder2 (2 x 4). Needs the demo's topics on the
running embedded broker (``apmae demo`` first). Then:

1. the tiny SC2 mines the demo's files into ``demo.patterns.mine`` (the evaluation set,
   beside SmolLM2's), and other JDK files into ``xeval.patterns.mine`` (its training set:
   a random model is never right, so it has no ``patterns.train`` of its own);
2. ``xeval.patterns.train`` gets SmolLM2's training patterns and the tiny model's set;
3. one small AP-MAE per model (``--target-model``), the same steps each;
4. ``apmae eval`` of both checkpoints on ``demo.patterns.mine``: a 2 x 2 matrix.

    python benchmarks/cross_eval.py [--steps 300]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._common import RESULTS, write_result  # noqa: E402


def main() -> None:
    from apmae.config import BusConfig, from_flat
    from apmae.corpus import CorpusStats, default_jdk_corpus, open_corpus
    from apmae.recipe import TrainingConfig
    from apmae.tiny import SAMPLE_JAVA, save_tiny
    from apmae.topics import FILES, PATTERNS_MINE, PATTERNS_TRAIN, FileRecord
    from services import evaluate
    from services.bus import Bus, Output
    from services.producer import Producer, ProducerConfig
    from services.replay import ReplayConfig, replay
    from services.trainer import Trainer, TrainerConfig, latest_checkpoint

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--state-dir", default=".apmae")
    ap.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args()
    base = dict(bootstrap_servers=args.bootstrap_servers, redis_url=args.redis_url, state_dir=Path(args.state_dir))
    demo, xeval = BusConfig(**base, topic_prefix="demo."), BusConfig(**base, topic_prefix="xeval.")
    tiny = str(save_tiny(Path(args.state_dir) / "models" / "tiny-sc2", [SAMPLE_JAVA] * 3))

    # 1. the tiny model's patterns: evaluation set on the demo's files, training set on others
    common = dict(model=tiny, mine_per_task=100_000, balance_slack=100_000, noise_every=0, spans_per_task=2)
    Producer(from_flat(ProducerConfig, **vars(demo), group="producer-tiny", **common)).processor_for().run(
        idle_timeout_s=20)
    bus = Bus(xeval, "cross-eval")
    bus.ensure_topics()
    files = (f for f in open_corpus(default_jdk_corpus(), CorpusStats()) if 4_000 < len(f.content) < 60_000)
    for f in itertools.islice(files, 2000, 2012):  # far from the demo's slice
        bus.send(Output(FILES, FileRecord(id=f.id, source=f.source, path=f.path, content=f.content)))
    bus.flush()
    Producer(from_flat(ProducerConfig, **vars(xeval), **common)).processor_for().run(idle_timeout_s=20)

    # 2. one training topic holding both models' training sets
    replay(ReplayConfig(**vars(demo), topic=PATTERNS_TRAIN.name, to_topic="xeval.patterns.train"), progress=False)
    replay(ReplayConfig(**vars(xeval), topic=PATTERNS_MINE.name, to_topic="xeval.patterns.train"), progress=False)

    # 3. one AP-MAE per target model
    checkpoints = {}
    for name, model in (("smollm2", "local:smollm2"), ("tiny-sc2", tiny)):
        recipe = TrainingConfig(variant="small", batch_size=32, steps=args.steps, lr=1e-3, warmup_steps=30)
        cfg = TrainerConfig(**vars(xeval), train=recipe, checkpoint_every=args.steps, name=f"xeval-{name}",
                            target_model=model, idle_timeout_s=30)
        out = Trainer(cfg).run()
        checkpoints[name] = latest_checkpoint(cfg.run_dir)
        print(name, out)

    # 4. Table 2: every checkpoint on every model's held-out mined patterns
    # n counts samples (5 heads drawn from each): 1000 samples with every head would hold
    # ~1000 x 270 patterns in memory
    matrix = evaluate.run(demo, list(checkpoints.values()), "topic:patterns.mine", 1000,
                          RESULTS / "cross-eval-figure1.png", per_sample=5)
    print("wrote", write_result("cross_eval", {"steps": args.steps, "checkpoints": {k: str(v) for k, v in
                                                                                    checkpoints.items()},
                                               "matrix": json.loads(evaluate.dump(matrix))}))


if __name__ == "__main__":
    main()
