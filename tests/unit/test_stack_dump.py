"""A service prints every thread's stack on SIGUSR1 and goes on (services.runtime): what the
fault tests send a process that did not end, so that a hang on the CI machine is diagnosed
from that run's report."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

_SERVICE = """
import sys, threading, time
sys.path.insert(0, {root!r})
from services.runtime import dump_stacks_on_sigusr1
dump_stacks_on_sigusr1()

def waiting_on_the_client():
    time.sleep(30)

threading.Thread(target=waiting_on_the_client, daemon=True).start()
print("ready", flush=True)
time.sleep(3)
print("went on", flush=True)
"""


def test_sigusr1_prints_every_threads_stack_and_the_process_goes_on():
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-c", _SERVICE.format(root=root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)  # the helper thread is in its sleep
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "went on" in out
    assert err.count("hread 0x") == 2, err  # the main thread ("Current thread 0x") and the helper
    assert "waiting_on_the_client" in err
