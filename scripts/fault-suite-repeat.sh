#!/usr/bin/env bash
# Run the whole fault suite (pytest -m fault: the fault matrix and test_faults.py) N times in a
# row on this code, stopping at the first failure: no cell's outcome may depend on where a fault lands.
#
#   scripts/fault-suite-repeat.sh [N]      (default 10; 18-20 min a run on 2 cores, 2026-12-03)
#
# Resumable: each finished run appends one JSON line to docs/fault-suite-runs.jsonl (commit,
# code, run, passed, failed, seconds, and every FAULT row it printed); runs already recorded
# for this code count towards N. "code" hashes what the suite runs (services, apmae, tests,
# scripts, the build files), not the commit: a commit of notes or results between runs does
# not start the count again, a change to any code does. Long: start it in the background
# (nohup ... &), never in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10}
log=docs/fault-suite-runs.jsonl
commit=$(git rev-parse --short HEAD)
paths=(services apmae tests scripts pyproject.toml Makefile)
code=$(git ls-tree -r HEAD -- "${paths[@]}" | git hash-object --stdin | cut -c1-12)
dirty=$(git status --porcelain --untracked-files=no -- "${paths[@]}" | grep -q . && echo true || echo false)
mkdir -p "$(dirname "$log")"
touch "$log"
# runs of this code so far, or the first failure's line (then there is no row of N)
tally() {
    .venv/bin/python - "$log" "$code" <<'EOF'
import json, sys
runs = [r for r in map(json.loads, filter(str.strip, open(sys.argv[1]))) if r.get("code") == sys.argv[2] and not r["dirty"]]
bad = [r for r in runs if r["exit"] != 0]
print(f"failed {bad[0]['run']}: {bad[0]['failed_tests']}" if bad else len(runs))
EOF
}
while true; do
    done_runs=$(tally)
    case "$done_runs" in failed*) echo "this code's run $done_runs: not $n in a row"; exit 1;; esac
    [ "$done_runs" -ge "$n" ] && { echo "$n runs in a row passed on code $code"; break; }
    run=$((done_runs + 1))
    out=$(mktemp /tmp/fault-suite-XXXX.log)
    echo "fault suite run $run of $n on code $code, commit $commit (log: $out)"
    start=$(date +%s)
    set +e
    .venv/bin/python -m pytest -p no:cacheprovider -m fault -s -q > "$out" 2>&1
    rc=$?
    set -e
    secs=$(( $(date +%s) - start ))
    .venv/bin/python - "$out" "$commit" "$code" "$run" "$rc" "$secs" "$dirty" >> "$log" <<'EOF'
import json, re, sys
path, commit, code, run, rc, secs, dirty = sys.argv[1:]
text = open(path, errors="replace").read()
summary = re.findall(r"^=* ?(\d+ (?:passed|failed).*) in [\d.]+s", text, re.M)
counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", summary[-1] if summary else "")}
cells = [json.loads(m) for m in re.findall(r"FAULT (\{.*\})", text)]
failed = re.findall(r"^FAILED (.+?)(?: - .*)?$", text, re.M)
print(json.dumps({"commit": commit, "code": code, "dirty": dirty == "true", "run": int(run), "exit": int(rc),
                  "passed": counts.get("passed", 0), "failed": counts.get("failed", 0),
                  "errors": counts.get("error", 0) + counts.get("errors", 0), "seconds": int(secs),
                  "failed_tests": failed, "cells": cells}))
EOF
    tail -1 "$log" | cut -c1-200
    [ "$dirty" = true ] && { echo "uncommitted changes to the code: a run, not one of a row"; exit 1; }
done
