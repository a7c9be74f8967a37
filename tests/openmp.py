"""Counting the OpenMP workers a side thread leaves behind.

torch (GNU OpenMP) gives every thread that runs a parallel CPU op its own thread team, whose
parked workers stay as long as that thread lives; beside such a team the training step ran
at 0.80x (small) and 0.87x (paper) (benchmarks/omp_threads.py, 2026-12-03). The trainer's
prefetch thread and the producer's publisher thread must therefore do no torch op.
"""

from __future__ import annotations

import os
import threading


def native_threads() -> set[int]:
    """Thread ids of this process that are not Python threads (OpenMP's workers are not)."""
    return {int(t) for t in os.listdir("/proc/self/task")} - {t.native_id for t in threading.enumerate()}


def workers_beside(work) -> int:
    """Threads that are not Python's, started while a side thread did ``work``, counted while
    it is still alive (a team lives as long as its thread). Other threads starting or ending
    meanwhile do not count."""
    did, release = threading.Event(), threading.Event()
    error: list[BaseException] = []

    def side() -> None:
        try:
            work()
        except BaseException as e:  # surfaced to the test, not lost on the thread
            error.append(e)
        did.set()
        release.wait(60)

    before = native_threads()
    t = threading.Thread(target=side)
    t.start()
    did.wait(60)
    n = len(native_threads() - before)
    release.set()
    t.join()
    if error:
        raise error[0]
    return n
