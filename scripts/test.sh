#!/usr/bin/env bash
# Set up from nothing (scripts/setup.sh) and run the whole test suite; extra args go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
export MLFLOW_ALLOW_FILE_STORE=true
set +e
"${DOLLYFLOW_VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"
rc=$?
set -e
[ $rc -eq 5 ] && { echo "no tests were collected" >&2; exit 1; }
exit $rc
