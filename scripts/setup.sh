#!/usr/bin/env bash
# Set up dollyflow's virtual environment from nothing; a quick no-op when nothing changed.
#
#   scripts/setup.sh                 # .venv with extras spark,train,ctranslate2,eval,harness,filter,dev
#   DOLLYFLOW_EXTRAS=spark,dev scripts/setup.sh
#
# Order matters on machines without a GPU: torch is installed first (torch==2.13.0, the CPU wheel
# where one is on the local find-links), then the package and its extras are installed with
# --no-build-isolation against that torch, constrained so pip can never swap it for a CUDA build.
# GPU users keep their own torch: install it into .venv before running this script (or set
# DOLLYFLOW_TORCH="torch==X.Y.Z" / a wheel path); a torch already in the venv is never replaced.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV="${DOLLYFLOW_VENV:-$ROOT/.venv}"
EXTRAS="${DOLLYFLOW_EXTRAS:-spark,train,ctranslate2,eval,harness,filter,dev}"
TORCH_SPEC="${DOLLYFLOW_TORCH:-torch==2.13.0}"
PY="${PYTHON:-python3}"
log() { echo "[setup] $*" >&2; }

# Java for Spark (Debian/Ubuntu, as root): only when no java is on PATH.
if ! command -v java >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing a Java runtime for Spark"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null
  else
    log "WARNING: no java on PATH; Spark jobs and tests need Java 17 or 21"
  fi
fi

[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
VPY="$VENV/bin/python"
want="$(cat setup.py scripts/setup.sh | sha256sum | cut -c1-16) extras=$EXTRAS torch=$TORCH_SPEC"
stamp="$VENV/.dollyflow-setup"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VPY" -c "import dollyflow" 2>/dev/null; then
  exit 0
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VPY" -m pip install -q --upgrade pip "setuptools>=70" wheel
if [[ ",$EXTRAS," == *",train,"* ]]; then
  if "$VPY" -c "import torch" 2>/dev/null; then
    log "keeping torch $("$VPY" -c 'import torch; print(torch.__version__)')"
  else
    log "installing $TORCH_SPEC first"
    "$VPY" -m pip install -q "$TORCH_SPEC"
  fi
fi
constraints="$VENV/dollyflow-constraints.txt"
: > "$constraints"
# The distribution's version (importlib.metadata), not torch.__version__: PyPI's CUDA wheel
# reports 2.13.0+cu130 at run time but installs as 2.13.0, and a constraint on the former
# matches nothing (pip: ResolutionImpossible).
torch_dist='import importlib.metadata as m; print(m.version("torch"))'
if "$VPY" -c "$torch_dist" >/dev/null 2>&1; then
  torch_version=$("$VPY" -c "$torch_dist")
  echo "torch==$torch_version" > "$constraints"
fi
log "installing dollyflow[$EXTRAS] (editable)"
DS_BUILD_OPS=0 "$VPY" -m pip install -q --no-build-isolation -c "$constraints" -e ".[$EXTRAS]"
if [ -n "${torch_version:-}" ]; then
  now=$("$VPY" -c "$torch_dist")
  [ "$now" = "$torch_version" ] || { log "ERROR: torch changed from $torch_version to $now"; exit 1; }
fi
echo "$want" > "$stamp"
log "ready: $VENV"
