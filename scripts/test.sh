#!/usr/bin/env bash
# The README's test command: install what the tests need, then lint, type-check and test.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${TOKENCAKE_VENV:-$root/.venv}
bash "$root/scripts/bootstrap.sh" test
cd "$root"
export PATH="$venv/bin:$PATH"
echo "== ruff check"; ruff check .
echo "== ruff format --check"; ruff format --check .
echo "== mypy"; mypy
echo "== pytest"
status=0
pytest -q -rs -p no:cacheprovider "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
fi
exit "$status"
