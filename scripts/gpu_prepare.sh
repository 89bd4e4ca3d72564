#!/usr/bin/env bash
# Run here, before scripts/gpu_check.sh travels to the GPU machine (which has no network):
# gathers into .gpu_carry/ what that machine lacks, a GoogleTest source tree and the
# pure-Python wheels the tests need. Pass .gpu_carry as a carried path.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu_carry/wheels
if [ ! -d .gpu_carry/googletest ]; then
  [ -d /usr/src/googletest ] || { echo "needs Debian's googletest package (/usr/src/googletest)" >&2; exit 1; }
  cp -r /usr/src/googletest .gpu_carry/googletest
fi
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu_carry/wheels expecttest==0.3.0
du -sh .gpu_carry
