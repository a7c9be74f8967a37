"""Live scoring (paper section 6 applied to a stream): the scorer's observe step and the
only accuracy it may report, the out-of-sample one.

A score is *in sample* when the classifier was fit on that very sample: its correctness
there says nothing about new code and is never called accuracy. Live accuracy is computed
on samples from files the classifier never saw (held out by file, not by row: samples of one
file share its identifiers and style).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from apmae.stats import proportion


@dataclass
class RollingScore:
    """Accuracy and Brier score over the last ``window`` out-of-sample labelled scores."""

    window: int = 200
    hits: deque = field(default_factory=deque)
    sq_err: deque = field(default_factory=deque)
    in_sample: int = 0  # scores not counted because the classifier was fit on the sample

    def observe(self, p: float, actual: bool | None, in_sample: bool | None) -> dict | None:
        """The scorer's observe step for one score. Returns the updated rolling numbers
        ({"accuracy", "brier", "n"}), or None when the score does not count: no label (noise)
        or in sample."""
        if actual is None:
            return None
        if in_sample:
            self.in_sample += 1
            return None
        self.hits.append((p >= 0.5) == bool(actual))
        self.sq_err.append((p - float(actual)) ** 2)
        while len(self.hits) > self.window:
            self.hits.popleft()
            self.sq_err.popleft()
        n = len(self.hits)
        return {"accuracy": sum(self.hits) / n, "brier": sum(self.sq_err) / n, "n": n}


def live_accuracy(scores: Iterable, file_of: dict[str, str], fit_files: set[str]) -> dict:
    """Accuracy of scores (records with ``sample_id``, ``prob_correct``, ``actual``) on samples
    whose file the classifier never saw. ``file_of``: sample id -> file id; ``fit_files``: the
    files of every sample any classifier was fit on. Scores of unknown files, unlabelled
    samples or seen files are left out and counted."""
    kept, files, seen_file, unknown = [], set(), 0, 0
    done: set[tuple[str, str]] = set()
    for s in scores:
        if s.actual is None or (s.sample_id, s.task) in done:
            continue
        done.add((s.sample_id, s.task))
        f = file_of.get(s.sample_id)
        if f is None:
            unknown += 1
        elif f in fit_files or getattr(s, "in_sample", None):
            seen_file += 1
        else:
            kept.append((s.prob_correct >= 0.5) == bool(s.actual))
            files.add(f)
    p = proportion(kept)
    return {"accuracy": p["rate"], "n": p["n"], "ci95": p["ci95"], "in_sample": False,
            "left_out_seen_files": seen_file, "left_out_unknown_file": unknown,
            "files": len(files)}
