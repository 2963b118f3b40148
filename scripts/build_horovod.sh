#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (the last release) for the optional `horovod` launcher.
#
#   bash scripts/build_horovod.sh                 # into .venv (or $DOLLYFLOW_VENV, or PYTHON=...)
#
# 0.28.1 does not compile against torch >= 2.1 as released: torch's headers need C++17 and
# Horovod's CMake files ask for C++14 (the upstream fix came after the release). This fetches the
# sdist from PyPI, switches those CMake settings to C++17 and builds it against the venv's own
# torch (--no-build-isolation, so pip cannot swap torch for another build): PyTorch only, Gloo
# controller, no MPI unless HOROVOD_WITH_MPI=1, no TensorFlow/MXNet; NCCL GPU operations when torch
# is a CUDA build and nvcc is found. Its `spark` extra (pyarrow<11) is not installed: horovod.spark.run needs
# only pyspark, which the `spark` extra provides. Takes ~3 minutes on 2 cores.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-${DOLLYFLOW_VENV:-$ROOT/.venv}/bin/python}
VERSION=${HOROVOD_VERSION:-0.28.1}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$PY" -c "import torch" || { echo "torch is not importable with $PY: install the train extra first" >&2; exit 1; }
for tool in cmake make g++; do
  command -v "$tool" >/dev/null || { echo "$tool is required to build horovod" >&2; exit 1; }
done

"$PY" -m pip download --quiet --no-binary :all: --no-deps --no-build-isolation "horovod==$VERSION" -d "$WORK"
tar -xzf "$WORK/horovod-$VERSION.tar.gz" -C "$WORK"
SRC="$WORK/horovod-$VERSION"

# C++14 -> C++17: the project, the PyTorch extension and the CUDA kernels' flags.
sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
sed -i 's/set(CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS} -std=c++11")/set(CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS} -std=c++17")/' \
  "$SRC/CMakeLists.txt"
if grep -q "CMAKE_CXX_STANDARD 14" "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"; then
  echo "the C++17 patch did not apply; the CMake files of horovod $VERSION differ from 0.28.1" >&2
  exit 1
fi

export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1
[ "${HOROVOD_WITH_MPI:-0}" = 1 ] || export HOROVOD_WITHOUT_MPI=1
# NCCL GPU operations only for a CUDA build of torch (a CPU torch next to a stray nvcc gets none)
TORCH_CUDA=$("$PY" -c "import torch; print(torch.version.cuda or '')")
if [ -n "$TORCH_CUDA" ] && command -v nvcc >/dev/null && [ -z "${HOROVOD_GPU_OPERATIONS:-}" ]; then
  export HOROVOD_GPU_OPERATIONS=NCCL
fi
export MAKEFLAGS="-j$(nproc)"

# keep the installed torch: pin it while pip resolves horovod's small dependencies
TORCH_PIN=$("$PY" -c "import torch; print('torch==' + torch.__version__)")
"$PY" -m pip install --no-build-isolation --constraint <(echo "$TORCH_PIN") "$SRC"

"$PY" -c "import horovod, horovod.torch, horovod.spark; print('horovod', horovod.__version__, 'built with gloo:', horovod.torch.gloo_built())"
