"""Mine the JDK's own src.zip, a real corpus every JDK carries (skipped where there is no JDK)."""

from __future__ import annotations

import itertools

import pytest

from apmae.corpus import CorpusStats, default_jdk_corpus, open_corpus
from apmae.tasks import SPAN_TASKS, mine_spans

JDK = default_jdk_corpus()


@pytest.mark.skipif(JDK is None, reason="no JDK src.zip on this machine (set JAVA_HOME to a JDK with lib/src.zip)")
def test_mines_every_task_from_the_jdk_sources():
    stats = CorpusStats()
    per_file = []
    for f in itertools.islice(open_corpus(JDK, stats), 150):
        res = mine_spans(f.content.encode())
        per_file.append((f.path, res.counts(), res.parse_errors))
    totals = {t: sum(c[t] for _, c, _ in per_file) for t in SPAN_TASKS}
    print(f"\n{JDK}: {len(per_file)} files; candidates per task per file (mean):")
    for t in SPAN_TASKS:
        print(f"  {t:20s} {totals[t] / len(per_file):8.1f}")
    assert len(per_file) == 150
    assert all(totals[t] > 0 for t in SPAN_TASKS), totals
    # real, well-formed JDK code parses cleanly almost everywhere
    assert sum(e == 0 for *_, e in per_file) >= 0.95 * len(per_file)
    # proportions a Java reader would expect
    assert totals["identifier"] > totals["closing_bracket"] > totals["numeric_literal"]
