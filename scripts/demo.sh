#!/usr/bin/env bash
# The main job on a small built-in default: label synthetic attention maps with the
# pseudo-label op and write a PNG grid (map, sinks, labels) plus a summary.
#   scripts/demo.sh [--out DIR] [--batch N] [--grid HxW] [--seed S] [--device cuda]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
source "${SDRPN_VENV:-.venv}/bin/activate"
python -m sdrpn label-demo "$@"
