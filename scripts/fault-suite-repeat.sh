#!/usr/bin/env bash
# Run the whole fault suite (pytest -m fault: the fault matrix and test_faults.py) N times in a
# row on this commit, to show that no cell's outcome depends on where a fault lands.
#
#   scripts/fault-suite-repeat.sh [N]      (default 10; 33-42 min a run on 2 cores, 2026-12-02)
#
# Resumable: each finished run appends one JSON line to docs/fault-suite-runs.jsonl (commit,
# run, passed, failed, seconds, and every FAULT row it printed); runs already recorded for
# this commit count towards N. Long: start it in the background (nohup ... &), never in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10}
log=docs/fault-suite-runs.jsonl
commit=$(git rev-parse --short HEAD)
dirty=$(git status --porcelain --untracked-files=no | grep -qv "$log" && echo true || echo false)
mkdir -p "$(dirname "$log")"
touch "$log"
while true; do
    done_runs=$(grep -c "\"commit\": \"$commit\"" "$log" || true)
    [ "$done_runs" -ge "$n" ] && break
    run=$((done_runs + 1))
    out=$(mktemp /tmp/fault-suite-XXXX.log)
    echo "fault suite run $run of $n on $commit (log: $out)"
    start=$(date +%s)
    set +e
    .venv/bin/python -m pytest -p no:cacheprovider -m fault -s -q > "$out" 2>&1
    rc=$?
    set -e
    secs=$(( $(date +%s) - start ))
    .venv/bin/python - "$out" "$commit" "$run" "$rc" "$secs" "$dirty" >> "$log" <<'EOF'
import json, re, sys
path, commit, run, rc, secs, dirty = sys.argv[1:]
text = open(path, errors="replace").read()
summary = re.findall(r"^=* ?(\d+ (?:passed|failed).*) in [\d.]+s", text, re.M)
counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", summary[-1] if summary else "")}
cells = [json.loads(m) for m in re.findall(r"FAULT (\{.*\})", text)]
failed = re.findall(r"^FAILED (.+?)(?: - .*)?$", text, re.M)
print(json.dumps({"commit": commit, "dirty": dirty == "true", "run": int(run), "exit": int(rc),
                  "passed": counts.get("passed", 0), "failed": counts.get("failed", 0),
                  "errors": counts.get("error", 0) + counts.get("errors", 0), "seconds": int(secs),
                  "failed_tests": failed, "cells": cells}))
EOF
    tail -1 "$log" | cut -c1-200
done
