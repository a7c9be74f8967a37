"""Failpoints: the spec parses or says what is wrong; an armed point fires once, on its n-th hit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from kafka.errors import KafkaTimeoutError

from services.bus import failpoints


def test_the_spec_parses_and_bad_specs_say_what_is_wrong():
    assert failpoints.parse("") == {}
    assert failpoints.parse("after-flush=kill@3, flush=raise") == {"after-flush": ("kill", 3), "flush": ("raise", 1)}
    for bad in ("nowhere=kill", "flush=explode", "flush=raise@0", "flush=raise@x", "flush"):
        with pytest.raises(ValueError, match="point=action"):
            failpoints.parse(bad)


def test_an_armed_point_fires_once_on_its_nth_hit(monkeypatch):
    monkeypatch.setattr(failpoints, "_armed", failpoints.parse("flush=raise@2"))
    monkeypatch.setattr(failpoints, "_reached", {})
    ran = []
    failpoints.hit("flush", before=lambda: ran.append(1))  # 1st: not yet, and `before` does not run
    assert not ran
    with pytest.raises(KafkaTimeoutError, match="failpoint flush"):
        failpoints.hit("flush", before=lambda: ran.append(2))
    assert ran == [2]
    failpoints.hit("flush")  # 3rd: fired already
    failpoints.hit("after-flush")  # not armed


def test_kill_is_a_sigkill_nothing_after_it_runs():
    code = "from services.bus import failpoints\nfailpoints.hit('after-flush')\nprint('survived')"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"APMAE_FAILPOINTS": "after-flush=kill", "PATH": "/usr/bin:/bin"},
                       cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == -9 and "survived" not in p.stdout, (p.returncode, p.stderr[-500:])
