#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: Debian packages, the .venv with the pinned Python
# dependencies, and an editable build of the extension. A second run with nothing
# changed only compares stamps.
#
#   SDRPN_VENV=DIR      where the virtual environment lives (default .venv)
#   SDRPN_CPU_ONLY=1    build the Python extension without CUDA (the default on a machine
#                       without a GPU: CMake still compiles and links every .cu file)
#   SDRPN_EVAL=0        leave out the `eval` extra (lmms-eval; its test then skips)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${SDRPN_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
log() { echo "[setup] $*"; }

# Debian packages: the C++ toolchain, CMake + ninja, GoogleTest, clang-format.
missing=()
for pkg in g++ cmake ninja-build libgtest-dev libgmock-dev clang-format git; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
"$PYTHON" -c "import venv, ensurepip" 2>/dev/null || missing+=(python3-venv)
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
req_stamp="$VENV/.sdrpn-requirements"
req_hash=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$req_stamp" 2>/dev/null)" != "$req_hash" ]; then
  log "installing pinned Python dependencies"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements.txt
  echo "$req_hash" >"$req_stamp"
fi

# The `eval` extra (lmms-eval, for the lmms-eval model and its test) with requirements.txt
# as constraints: lmms-eval alone would pull the newest torch and move the pinned packages.
if [ "${SDRPN_EVAL:-1}" != 0 ]; then
  eval_reqs=$("$VENV/bin/python" -c 'try:
    import tomllib
except ImportError:  # Python 3.10: the copy pip carries
    from pip._vendor import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    print(" ".join(tomllib.load(f)["project"]["optional-dependencies"]["eval"]))')
  eval_stamp="$VENV/.sdrpn-eval"
  eval_hash=$(echo "$req_hash $eval_reqs" | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$eval_stamp" 2>/dev/null)" != "$eval_hash" ]; then
    log "installing the eval extra: $eval_reqs"
    # shellcheck disable=SC2086  # one argument per requirement
    "$VENV/bin/python" -m pip install -q -c requirements.txt $eval_reqs
    echo "$eval_hash" >"$eval_stamp"
  fi
fi

# The Python extension: rebuilt only when a source, the build files or the flags change.
if [ -z "${SDRPN_CPU_ONLY:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  export SDRPN_CPU_ONLY=1
fi
build_stamp="$VENV/.sdrpn-build"
build_hash=$( (find csrc include -type f -print0 | sort -z | xargs -0 sha256sum
               sha256sum setup.py pyproject.toml
               env | grep -E '^(SDRPN_CPU_ONLY|SDRPN_FORCE_CUDA|SDRPN_CUDA_ARCHS|TORCH_CUDA_ARCH_LIST)=' | sort) | sha256sum | cut -d' ' -f1)
if [ "$(cat "$build_stamp" 2>/dev/null)" != "$build_hash" ] || ! ls python/sdrpn/_C*.so >/dev/null 2>&1; then
  log "building the extension (SDRPN_CPU_ONLY=${SDRPN_CPU_ONLY:-0})"
  MAX_JOBS=${MAX_JOBS:-$(nproc)} "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
  echo "$build_hash" >"$build_stamp"
fi
log "ready: $("$VENV/bin/python" -c 'import sdrpn; print(sdrpn.build_info())')"
