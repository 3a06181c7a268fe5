#!/usr/bin/env bash
# The GPU ready check (docs/operations.md, "GPU ready check"): on a machine with one NVIDIA
# GPU, torch (CUDA), cupy, numpy and msgpack preinstalled and no network, install the
# project's other pure-Python dependencies from a folder of wheels, run every `gpu`-marked
# test, then bench/bench_gpu.py, and print one summary table. Exits non-zero on any failure.
#
#   scripts/gpu-check.sh WHEEL_DIR            # on the GPU machine (not yet run on one: time unknown)
#   scripts/gpu-check.sh --dry-run [WHEEL_DIR]
#       no GPU needed: checks the Python and the imports, runs the gpu tests (they skip) and
#       the bench on the FAKE device (CPU tensors), so the script cannot rot unnoticed; with
#       WHEEL_DIR it also resolves the install from the wheels (pip --dry-run).
#
# Fetch the wheels on a machine with network, for the GPU host's Python (the script prints
# which one it found; 3.11 below) -- the command is in docs/operations.md:
#   pip download --only-binary=:all: --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --python-version 3.11 --implementation cp --abi cp311 -d wheels \
#     pyzmq msgspec click rich aiohttp prometheus-client pytest pytest-timeout
set -euo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY=1
    shift
fi
WHEELS="${1:-}"
if [[ $DRY == 0 && -z "$WHEELS" ]]; then
    echo "usage: scripts/gpu-check.sh WHEEL_DIR | --dry-run [WHEEL_DIR]" >&2
    exit 2
fi
if [[ -n "$WHEELS" && ! -d "$WHEELS" ]]; then
    echo "gpu-check: no wheel folder $WHEELS" >&2
    exit 2
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the source tree; no build needed
DEPS=(pyzmq msgspec click rich aiohttp prometheus-client pytest pytest-timeout)
# Every gpu-marked test lives here (tests/daemon/gpu/test_gpu_check.py keeps it so); with
# them the vLLM connector's worker side, its copy paths and its lending to the daemon's copy
# worker (connectors/vllm/connector_worker.py, lending.py: they import no vLLM, which
# tests/test_layers.py checks) and the copies in vLLM 0.32's KV cache layouts.
GPU_TESTS=(tests/connectors/vllm/test_gpu_copy.py tests/daemon/gpu)
REPORT="${GPU_CHECK_JSON:-$ROOT/gpu-check.json}"
if [[ $DRY == 1 ]]; then
    REPORT="$(mktemp -t gpu-check-XXXXXX.json)"
    trap 'rm -f "$REPORT"' EXIT
fi
declare -a SUMMARY=()
STATUS=0

step() {  # step NAME COMMAND...: run it, record ok/FAILED and its time
    local name="$1" start rc
    shift
    start=$(date +%s)
    echo "== $name"
    set +e
    "$@"
    rc=$?
    set -e
    if [[ $rc == 0 ]]; then
        SUMMARY+=("$(printf '%-44s %-8s %4ss' "$name" ok $(($(date +%s) - start)))")
    else
        SUMMARY+=("$(printf '%-44s %-8s %4ss' "$name" "FAILED($rc)" $(($(date +%s) - start)))")
        STATUS=1
    fi
}

python_found() {
    "$PY" - <<'EOF'
import platform, sys, sysconfig
print(f"python {platform.python_version()} at {sys.executable}")
print(f"platform tag {sysconfig.get_platform()}, abi cp{sys.version_info[0]}{sys.version_info[1]}")
print("  pip download ... --python-version "
      f"{sys.version_info[0]}.{sys.version_info[1]} --abi cp{sys.version_info[0]}{sys.version_info[1]}")
EOF
}

preinstalled() {
    "$PY" - "$DRY" <<'EOF'
import importlib, sys
dry = sys.argv[1] == "1"
missing = []
for name in ("torch", "numpy", "msgpack", "cupy"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name} {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # cupy raises more than ImportError without a driver
        missing.append(name)
        print(f"  {name} missing ({type(exc).__name__}: {exc})")
import torch
cuda = torch.cuda.is_available()
print(f"  torch.cuda.is_available() = {cuda}"
      + (f", {torch.cuda.get_device_name(0)}" if cuda else ""))
if dry:  # no GPU expected; cupy is optional (the data plane uses torch first)
    sys.exit(1 if {"torch", "numpy", "msgpack"} & set(missing) else 0)
sys.exit(1 if missing or not cuda else 0)
EOF
}

install_deps() {
    if [[ -z "$WHEELS" ]]; then
        echo "  no wheel folder: using what is installed"
        return 0
    fi
    local extra=()
    [[ $DRY == 1 ]] && extra=(--dry-run)
    "$PY" -m pip install --no-index --find-links "$WHEELS" "${extra[@]}" "${DEPS[@]}"
}

imports() {
    "$PY" -c "import zmq, msgspec, click, rich, prometheus_client, pytest, tokencake.daemon.server, \
tokencake.daemon.gpu.copy_worker, tokencake.clients.gpu_lending, \
tokencake.connectors.vllm.connector_worker, tokencake.connectors.vllm.lending; \
print('  imports ok (no vLLM needed)')"
}

gpu_tests() {
    # -m gpu: every gpu-marked test; without CUDA they skip (the dry run), and "no tests
    # ran" (exit 5) would mean the marker lost its tests: a failure either way.
    "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs "${GPU_TESTS[@]}"
}

bench() {  # its table is printed once, in the summary; its whole output only if it failed
    local out rc=0
    rm -f "$REPORT"
    out="$(mktemp -t gpu-check-bench-XXXXXX.log)"
    if [[ $DRY == 1 ]]; then
        "$PY" bench/bench_gpu.py --device cpu --quick --json "$REPORT" >"$out" 2>&1 || rc=$?
    else
        "$PY" bench/bench_gpu.py --json "$REPORT" >"$out" 2>&1 || rc=$?
    fi
    [[ $rc == 0 ]] || cat "$out"
    rm -f "$out"
    return $rc
}

bench_table() {  # the bench's figures again, under the steps: one closing table
    [[ -s "$REPORT" ]] || return 0
    "$PY" - "$REPORT" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
fake = report["device"] != "cuda"
print(f"-- bench/bench_gpu.py on {report['device']}" + (" (FAKE: no real figure)" if fake else ""))
for name, value, unit, target in report["rows"]:
    print(f"{name:<48}{value:>12.3f}  {unit:<6}{target}")
EOF
}

step "python" python_found
step "preinstalled: torch, numpy, msgpack, cupy" preinstalled
step "install from wheels" install_deps
step "imports" imports
step "gpu-marked tests" gpu_tests
step "bench/bench_gpu.py" bench

echo
echo "== gpu-check summary ($([[ $DRY == 1 ]] && echo 'DRY RUN, fake device' || echo GPU))"
printf '%s\n' "${SUMMARY[@]}"
bench_table
exit $STATUS
