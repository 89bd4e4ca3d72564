#!/usr/bin/env bash
# Checks style and layering, builds and runs every test: ruff (lint + format), clang-format,
# the import direction of the Python package, GoogleTest through ctest, then pytest.
# Non-zero on any failure.
#
#   SDRPN_WITH_CUDA=ON|OFF|AUTO   CMake's CUDA kernels (AUTO: when torch has CUDA and nvcc is found)
#   SDRPN_CUDA_ARCHS="8.0;9.0"    architectures for nvcc
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"
scripts/setup.sh
source "${SDRPN_VENV:-.venv}/bin/activate"

ruff check .
ruff format --check .
clang-format --dry-run --Werror $(git ls-files -co --exclude-standard -- '*.h' '*.cpp' '*.cu')
python scripts/check_imports.py

BUILD=build/cmake
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DSDRPN_WITH_CUDA="${SDRPN_WITH_CUDA:-AUTO}" -DSDRPN_CUDA_ARCHS="${SDRPN_CUDA_ARCHS:-8.0;9.0}" \
  ${SDRPN_CMAKE_ARGS:-}
cmake --build "$BUILD" -j "${MAX_JOBS:-$(nproc)}"
ctest --test-dir "$BUILD" --output-on-failure --no-tests=error
python -m pytest tests/python "$@"
