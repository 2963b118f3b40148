#!/usr/bin/env bash
# Set up from nothing and run the whole pipeline on local Spark with a tiny model:
# the real dolly sample from ../shared when present (else a generated one), Delta tables under
# ./warehouse. Extra args are config overrides, e.g. `scripts/run_local.sh dedupe.threshold=0.8`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
exec "${DOLLYFLOW_VENV:-$ROOT/.venv}/bin/python" -m dollyflow quickstart "$@"
