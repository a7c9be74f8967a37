"""Proportions and their confidence intervals: every accuracy and rate apmae reports.

An accuracy over n predictions is a binomial proportion, so its interval is the Wilson score
interval: it stays inside [0, 1] (a t-interval over fold means does not: four folds at
1, 1, 1, 0.5 give 0.875 +- 0.40), it is not degenerate at 0 or n successes, and it is
computed over the pooled predictions (every sample counted once), not over fold means.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) Wilson score interval of ``successes / n``; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside 0..{n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # By construction the interval holds p and lies inside [0, 1]; at k = 0 or k = n the bound
    # meets p exactly, and rounding can put it a few ulp on the wrong side (e.g. k=0, n=6 gave
    # low = 5.6e-17 > p, and matplotlib refused the negative error bar): clamp to p and [0, 1].
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def proportion(flags: Iterable[bool]) -> dict:
    """{"rate", "n", "successes", "ci95": [low, high]} of a sequence of booleans (Wilson 95%)."""
    values = [bool(f) for f in flags]
    k, n = sum(values), len(values)
    lo, hi = wilson_interval(k, n)
    return {"rate": k / n if n else None, "n": n, "successes": k, "ci95": [lo, hi]}


def mcnemar(before: Iterable[bool], after: Iterable[bool]) -> dict:
    """Exact McNemar test of paired outcomes (the same inputs, two conditions): ``lost`` =
    right before and wrong after, ``gained`` = the reverse; two-sided binomial p-value of the
    discordant pairs against 1/2 (1.0 when there are none)."""
    from scipy.stats import binomtest

    pairs = [(bool(a), bool(b)) for a, b in zip(before, after, strict=True)]
    lost = sum(a and not b for a, b in pairs)
    gained = sum(b and not a for a, b in pairs)
    p = 1.0 if lost + gained == 0 else float(binomtest(lost, lost + gained, 0.5).pvalue)
    return {"lost": lost, "gained": gained, "p_value": p}


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1) of a family of tests.

    The study tests one classifier per task against chance; with ten tasks a raw p < 0.05 is
    expected once in two studies by chance alone, so a task shows signal only where its
    adjusted p is below 0.05. Written here rather than taken from statsmodels (a ~60 MB
    dependency for six lines, not installed otherwise)."""
    order = sorted(p_values, key=p_values.get)
    m, running, out = len(order), 0.0, {}
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[key]))
        out[key] = running
    return out
