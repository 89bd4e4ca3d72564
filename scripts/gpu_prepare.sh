#!/usr/bin/env bash
# Run here, before scripts/gpu_check.sh travels to the GPU machine (which has no network):
# gathers into .gpu_carry/ what that machine lacks, a GoogleTest source tree, the
# pure-Python wheels the tests need and a build of the extension for sm_90. Pass .gpu_carry
# as a carried path.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu_carry/wheels
if [ ! -d .gpu_carry/googletest ]; then
  [ -d /usr/src/googletest ] || { echo "needs Debian's googletest package (/usr/src/googletest)" >&2; exit 1; }
  cp -r /usr/src/googletest .gpu_carry/googletest
fi
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu_carry/wheels expecttest==0.3.0
# The extension with its CUDA kernels for sm_90 (H100 and H200), built here where nvcc is, so
# that the GPU machine's minutes go to measuring; gpu_check.sh takes it only where its Python,
# torch and sources are the ones it was built from (extension_abi.sh) and its kernels run,
# and builds otherwise.
if [ -x .venv/bin/python ] && { command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; }; then
  rm -rf .gpu_carry/prebuilt build/prebuilt
  if PATH=$PATH:/usr/local/cuda/bin SDRPN_FORCE_CUDA=1 SDRPN_CUDA_ARCHS=9.0 MAX_JOBS=${MAX_JOBS:-4} \
    .venv/bin/python setup.py -q build_ext --build-lib build/prebuilt/lib --build-temp build/prebuilt/tmp; then
    mkdir -p .gpu_carry/prebuilt
    cp build/prebuilt/lib/sdrpn/_C*.so .gpu_carry/prebuilt/
    bash scripts/extension_abi.sh .venv/bin/python >.gpu_carry/prebuilt/ABI
  else
    echo "the sm_90 build failed: gpu_check.sh will build on the GPU machine" >&2
  fi
fi
du -sh .gpu_carry
