"""Task mining speed on the JDK corpus, one core: files/s, MB/s, candidates per task.

    python benchmarks/mining.py [--files 3000] [--corpus PATH]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import table, write_result


def main() -> None:
    from apmae.corpus import CorpusStats, default_jdk_corpus, open_corpus
    from apmae.tasks import SPAN_TASKS, mine_spans

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--corpus", default=None)
    args = ap.parse_args()
    corpus = Path(args.corpus) if args.corpus else default_jdk_corpus()
    if corpus is None:
        sys.exit("no corpus: pass --corpus or install a JDK")
    stats = CorpusStats()
    files = [f.content.encode() for f in itertools.islice(open_corpus(corpus, stats), args.files)]
    total_bytes = sum(map(len, files))
    counts: Counter = Counter()
    errors = 0
    t0 = time.process_time()  # one core: CPU time of this process (tree-sitter is single-threaded)
    w0 = time.perf_counter()
    for src in files:
        r = mine_spans(src)
        counts.update(r.counts())
        errors += r.parse_errors > 0
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    rows = [{"corpus": corpus.name, "files": len(files), "MB": total_bytes / 1e6, "cpu_s": cpu, "wall_s": wall,
             "files_per_s": len(files) / cpu, "MB_per_s": total_bytes / 1e6 / cpu,
             "files_with_parse_errors": errors}]
    print(table(rows, list(rows[0])))
    crow = [{"task": t, "candidates": counts[t], "per_file": counts[t] / len(files)} for t in SPAN_TASKS]
    print(table(crow, ["task", "candidates", "per_file"]))
    print("wrote", write_result("mining", {"summary": rows[0], "candidates": crow, "corpus": str(corpus)}))


if __name__ == "__main__":
    main()
