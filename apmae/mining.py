"""What the producer mines from each file, and how much (paper 5.1).

Per file: ``spans_per_task`` candidates of every tree-sitter task, ``random_per_file``
random 3-10 token spans and, every ``noise_every`` files, a noise input. A prediction's
patterns are mined (every head of ``mine_layers`` x ``mine_heads``) while its task holds
fewer than ``mine_per_task`` samples, half correct and half incorrect; which samples train
AP-MAE instead is the :class:`~apmae.split.Split`'s rule. One config, one source of each
default: the producer holds it, and so do the demo and the study at their own sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

from apmae.config import nested, setting
from apmae.split import Split


@dataclass(frozen=True)
class MiningConfig:
    spans_per_task: int = setting(2, "Candidates sampled per tree-sitter task per file")
    random_per_file: int = setting(2, "Random-span (3-10 token) inputs per file")
    noise_every: int = setting(8, "One noise-task input every N files (0 = none)")
    mine_per_task: int = setting(10_000, "Mining samples per task and model (balanced correct/incorrect)")
    balance_slack: int = setting(8, "How far one label may run ahead of the other while mining")
    mine_layers: str = setting("", "Layers to mine, e.g. '0,4,8' or '0-29' (default: all)")
    mine_heads: str = setting("", "Heads to mine in each mined layer, e.g. '0-3' (default: all)")
    forward_full_tasks: bool = setting(True, "Run the model on candidates of tasks whose mining quota is full "
                                             "(their prediction is still published; the study turns this off)")
    split: Split = nested(Split())  # which samples train AP-MAE, which are mined (never both)
