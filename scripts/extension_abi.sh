#!/usr/bin/env bash
# What a build of the extension must match to be used: the Python and torch it is loaded
# into and the sources it was compiled from (one line; gpu_prepare.sh records it with the
# build it carries, gpu_check.sh compares it before taking that build).
set -euo pipefail
cd "$(dirname "$0")/.."
"${1:-python3}" -c "import sys, torch; print(sys.version_info[:2], torch.__version__, end=' ')"
find csrc include setup.py -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16
