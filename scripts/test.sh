#!/usr/bin/env bash
# Set up from nothing (scripts/setup.sh) and run the whole test suite; extra args go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
export MLFLOW_ALLOW_FILE_STORE=true
PY="${DOLLYFLOW_VENV:-$ROOT/.venv}/bin/python"
# Delta Lake's jars for the native-backend tests, resolved once per machine into the Ivy cache
# (~/.ivy2.5.2): the first run downloads about 90 MB from Maven Central. Bounded; with
# DOLLYFLOW_REQUIRE_NATIVE=1 (CI) a failure stops here, otherwise the native tests skip.
echo "test.sh: Delta Lake's jars (first run on this machine: resolved from Maven Central, up to 15 min)" >&2
if ! timeout 900 "$PY" -c 'import sys; from dollyflow.engine.session import resolve_delta_jars
ok, why = resolve_delta_jars(); print(("test.sh: native Delta ready: " if ok else "test.sh: no native Delta: ") + why, file=sys.stderr); sys.exit(0 if ok else 3)'; then
  [ "${DOLLYFLOW_REQUIRE_NATIVE:-0}" = 1 ] && { echo "test.sh: Delta's jars could not be resolved" >&2; exit 1; }
fi
set +e
"$PY" -m pytest "$@"
rc=$?
set -e
[ $rc -eq 5 ] && { echo "no tests were collected" >&2; exit 1; }
exit $rc
