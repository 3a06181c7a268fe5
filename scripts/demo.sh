#!/usr/bin/env bash
# The README's first command: install the daemon, start it on its embedded default and
# replay a small agent workload against it, printing what was offloaded and uploaded.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${TOKENCAKE_VENV:-$root/.venv}
bash "$root/scripts/bootstrap.sh" demo
exec "$venv/bin/python" -m tokencake.clients.demo "$@"
