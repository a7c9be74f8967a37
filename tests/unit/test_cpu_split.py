"""The benchmarks' CPU accounting (``benchmarks._common.cpu_split`` / ``span``): where a span's
CPU went, by thread group, including threads that end inside the span.

Asserted on CPU clocks, not wall time: each thread burns a known amount of its own CPU time.
Run in a fresh interpreter, since ``watch_thread_ends`` hooks ``threading`` process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys, threading, time
sys.path.insert(0, sys.argv[1])
from benchmarks._common import cpu_split, span, watch_thread_ends

def burn(seconds):
    t0 = time.thread_time()
    while time.thread_time() - t0 < seconds:
        pass

watch_thread_ends()
group = lambda t: t.name.split("-")[0]
before = threading.Thread(target=burn, args=(0.6,), name="long-1")  # alive at the span's start, ends inside
before.start()
burn(0.05)
a = cpu_split({}, group)
short = threading.Thread(target=burn, args=(0.3,), name="short-1")  # starts and ends inside
short.start(); short.join(); before.join()
alive = threading.Thread(target=lambda: (burn(0.2), time.sleep(3)), name="alive-1", daemon=True)  # runs past the end
alive.start()
burn(0.25)  # the main thread's own
b = cpu_split({}, group)
at_a = a["threads"][before.native_id][1]
print(json.dumps({"span": span(a, b), "long_before": at_a}))
"""


def test_a_span_counts_each_group_including_threads_that_ended_inside_it():
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT)], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    s = got["span"]
    assert s["short"] == pytest.approx(0.3, abs=0.05)  # started and ended inside: all of it
    assert s["long"] == pytest.approx(0.6 - got["long_before"], abs=0.05)  # only its part inside the span
    assert s["alive"] == pytest.approx(0.2, abs=0.05)  # still running at the end
    assert s["main"] == pytest.approx(0.25, abs=0.05)  # the rest of the process: the main thread's own
    # the main thread's states (the kernel's schedstat): its own 0.25 s on a CPU, and asleep
    # while it joined a thread that burned 0.3 s of its own
    assert s["main_thread_on_cpu"] == pytest.approx(0.25, abs=0.05)
    assert s["main_thread_waiting"] >= 0
    assert s["wall"] - s["main_thread_on_cpu"] - s["main_thread_waiting"] >= 0.25


def test_shares_are_medians_over_spans_of_each_part_over_every_core(monkeypatch):
    import os

    from benchmarks._common import cpu_shares

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    spans = [{"wall": 1.0, "main": 1.0, "input": 0.2}, {"wall": 2.0, "main": 3.0}, {"wall": 1.0, "main": 2.0}]
    got = cpu_shares(spans)
    assert got["main"] == pytest.approx(0.75)  # 0.5, 0.75, 1.0 of two cores
    assert got["input"] == pytest.approx(0.0)  # missing from two spans: 0 there
    assert "wall" not in got


def test_main_thread_states_are_medians_of_shares_of_each_span_s_wall():
    from benchmarks._common import cpu_shares, main_thread_states

    spans = [{"wall": 1.0, "main": 0.5, "main_thread_on_cpu": 0.5, "main_thread_waiting": 0.1},
             {"wall": 2.0, "main": 1.8, "main_thread_on_cpu": 1.8, "main_thread_waiting": 0.0},
             {"wall": 1.0, "main": 0.7, "main_thread_on_cpu": 0.7, "main_thread_waiting": 0.2}]
    got = main_thread_states(spans)
    assert got["on_cpu"] == pytest.approx(0.7)  # 0.5, 0.9, 0.7
    assert got["waiting"] == pytest.approx(0.1)  # 0.1, 0, 0.2
    assert got["asleep"] == pytest.approx(0.1)  # 0.4, 0.1, 0.1
    shares = cpu_shares(spans)  # beside the shares of every core, not among them
    assert shares["main_thread_on_cpu"] == pytest.approx(0.7) and "main_thread_waiting" in shares
    assert set(shares) - {"main_thread_on_cpu", "main_thread_waiting", "main_thread_asleep"} == {"main"}


def test_forward_states_count_the_main_thread_inside_the_wrapped_calls_only():
    """``ForwardStates``: CPU burnt and sleep inside the wrapped calls are counted; a sleep
    between them is not; ``main_thread_states`` then splits the sleep into in and out of the
    forward."""
    import time

    from benchmarks._common import ForwardStates, main_thread_states

    def forward(x):
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.1:
            pass
        time.sleep(0.1)
        return x + 1

    inside = ForwardStates(forward)
    assert inside(1) == 2 and inside(2) == 3
    time.sleep(0.3)  # the loop's own wait: outside the forward
    got = inside.as_span()
    assert got["main_thread_forward_on_cpu"] == pytest.approx(0.2, abs=0.05)
    asleep_inside = got["main_thread_forward_wall"] - got["main_thread_forward_on_cpu"] - got["main_thread_forward_waiting"]
    assert asleep_inside == pytest.approx(0.2, abs=0.05)  # the two sleeps inside
    inside.reset()
    assert inside.as_span() == {k: 0.0 for k in got}

    spans = [{"wall": 1.0, "main_thread_on_cpu": 0.6, "main_thread_waiting": 0.1, "main_thread_forward_wall": 0.8,
              "main_thread_forward_on_cpu": 0.6, "main_thread_forward_waiting": 0.1}]
    states = main_thread_states(spans)
    assert states["in_forward"] == pytest.approx(0.8)
    assert states["asleep_in_forward"] == pytest.approx(0.1)  # of the 0.3 asleep, 0.1 inside the forward
    assert states["asleep"] == pytest.approx(0.3)
    assert states["asleep_outside_forward"] == pytest.approx(0.2)
    assert "in_forward" not in main_thread_states([{k: v for k, v in spans[0].items() if "forward" not in k}])
