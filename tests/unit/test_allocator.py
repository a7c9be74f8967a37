"""The services' malloc tuning (services.runtime.tune_allocator): freed blocks are reused, not
handed back to the kernel and faulted in, zeroed, on the next allocation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# allocate, write and free a 64 MB block 20 times, as a training step's temporaries come and
# go; count the page faults that the kernel served meanwhile
_PROBE = """
import json, resource, sys
import numpy as np
sys.path.insert(0, {root!r})
tuned = False
if {tune}:
    from services.runtime import tune_allocator
    tuned = tune_allocator()
np.ones(1 << 20)  # numpy's own first allocations, outside the count
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    a = np.empty(8 << 20)  # 64 MB of float64
    a.fill(1.0)
    del a
print(json.dumps({{"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}}))
"""


def _faults(tune: bool) -> dict:
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", _PROBE.format(root=root, tune=tune)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt thresholds are glibc's (Linux)")
def test_tuned_malloc_reuses_freed_blocks_instead_of_faulting_in_new_pages():
    untuned, tuned = _faults(False), _faults(True)
    assert tuned["tuned"] is True
    # glibc's defaults: each 64 MB block is a fresh mapping, every page faulted in again;
    # tuned: the first block's pages serve all twenty
    assert untuned["faults"] > 5 * tuned["faults"], (untuned, tuned)
