"""scripts/bootstrap.sh's JDK step: a dangling src.zip symlink (Debian's jdk-headless alone)
counts as missing and installs the JDK plus its source package; a real src.zip installs nothing.
apt-get/apt-cache are stubs on PATH that record their arguments (nothing is installed)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_jdk_step(tmp_path: Path, jvm: Path) -> list[str]:
    script = (ROOT / "scripts/bootstrap.sh").read_text()
    func = re.search(r"^jdk_source\(\) \{.*?^\}", script, re.S | re.M).group(0)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    for tool in ("apt-get", "apt-cache", "sudo"):
        stub = bin_dir / tool
        body = 'exec "$@"' if tool == "sudo" else f'echo "{tool} $*" >> {log}'
        if tool == "apt-cache":  # openjdk-17-source "exists"
            body += '\ncase "$*" in *openjdk-17-source*) exit 0;; *) exit 1;; esac'
        stub.write_text(f"#!/bin/sh\n{body}\n")
        stub.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "APMAE_JVM_DIR": str(jvm), "HOME": str(tmp_path)}
    res = subprocess.run(["bash", "-c", f"set -euo pipefail\n{func}\njdk_source"], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return log.read_text().splitlines() if log.exists() else []


def test_dangling_src_zip_link_installs_the_jdk_and_its_source(tmp_path):
    jvm = tmp_path / "jvm"
    (jvm / "java-17-openjdk-amd64/lib").mkdir(parents=True)
    os.symlink("../../openjdk-17/src.zip", jvm / "java-17-openjdk-amd64/lib/src.zip")  # what jdk-headless ships
    calls = run_jdk_step(tmp_path, jvm)
    installs = [c for c in calls if c.startswith("apt-get") and " install " in c]
    assert len(installs) == 1 and installs[0].endswith("openjdk-17-jdk-headless openjdk-17-source"), calls


def test_a_real_src_zip_installs_nothing(tmp_path):
    jvm = tmp_path / "jvm"
    (jvm / "openjdk-17").mkdir(parents=True)
    (jvm / "openjdk-17/src.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    assert run_jdk_step(tmp_path, jvm) == []
