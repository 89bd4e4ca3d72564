#!/usr/bin/env bash
# Run here, before scripts/gpu_check.sh travels to the GPU machine (which has no network):
# gathers into .gpu_carry/ what that machine lacks, a GoogleTest source tree, the
# pure-Python wheels the tests need and a build of the extension for sm_90. Pass .gpu_carry
# as a carried path.
#
#   SDRPN_GPU_PYTHON=X.Y   the GPU machine's Python (default 3.12): the carried build is made
#                          with an interpreter of that version, which pyenv or PATH provides,
#                          in a build-only venv (build/py<X><Y>) holding the pinned torch
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu_carry/wheels
if [ ! -d .gpu_carry/googletest ]; then
  [ -d /usr/src/googletest ] || { echo "needs Debian's googletest package (/usr/src/googletest)" >&2; exit 1; }
  cp -r /usr/src/googletest .gpu_carry/googletest
fi
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu_carry/wheels expecttest==0.3.0

# An interpreter of version $1: python$1 on PATH, or one of pyenv's.
find_python() {
  local want=$1 candidate
  for candidate in "python$want" "$(pyenv root 2>/dev/null)/versions/$want"*/bin/python3; do
    if "$candidate" -c "import sys; sys.exit('%d.%d' % sys.version_info[:2] != '$want')" 2>/dev/null; then
      command -v "$candidate"
      return
    fi
  done
  return 1
}

# The extension with its CUDA kernels for sm_90 (H100 and H200), built here where nvcc is, so
# that the GPU machine's minutes go to measuring. A CPython extension loads only into the
# Python minor it was built for, so the build venv has the GPU machine's Python and the
# pinned torch. gpu_check.sh takes the build only where its Python, torch and sources are
# the ones it was built from (extension_abi.sh) and its kernels run, and builds otherwise.
want=${SDRPN_GPU_PYTHON:-3.12}
venv=build/py${want/./}
nvcc_dir=$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")
if [ ! -x "$nvcc_dir/nvcc" ]; then
  echo "no nvcc here: gpu_check.sh will build on the GPU machine" >&2
elif ! base=$(find_python "$want"); then
  echo "no Python $want here (PATH or pyenv): gpu_check.sh will build on the GPU machine" >&2
else
  if [ ! -x "$venv/bin/python" ]; then
    "$base" -m venv "$venv"
  fi
  mapfile -t pins < <(grep -E '^(torch|pybind11|ninja|setuptools|wheel)==' requirements.txt)
  "$venv/bin/python" -m pip install -q "${pins[@]}"
  abi=$(bash scripts/extension_abi.sh "$venv/bin/python")
  if [ "$(cat .gpu_carry/prebuilt/ABI 2>/dev/null)" = "$abi" ]; then
    echo "the carried sm_90 build is current ($abi)"
  else
    rm -rf .gpu_carry/prebuilt build/prebuilt
    if PATH=$PATH:$nvcc_dir SDRPN_FORCE_CUDA=1 SDRPN_CUDA_ARCHS=9.0 MAX_JOBS=${MAX_JOBS:-4} \
      "$venv/bin/python" setup.py -q build_ext --build-lib build/prebuilt/lib --build-temp build/prebuilt/tmp; then
      mkdir -p .gpu_carry/prebuilt
      cp build/prebuilt/lib/sdrpn/_C*.so .gpu_carry/prebuilt/
      echo "$abi" >.gpu_carry/prebuilt/ABI
    else
      echo "the sm_90 build failed: gpu_check.sh will build on the GPU machine" >&2
    fi
  fi
fi
du -sh .gpu_carry
