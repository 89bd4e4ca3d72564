#!/usr/bin/env bash
# The main job on the built-in default, the synthetic fine-detail task with its shipped tiny
# LLaVA: pseudo labels from the model's own attention (sdrpn label --answers self), a short
# RPN training, then test images answered with and without RoI crops. Writes outputs/demo/
# (report.md, examples.png, metrics.json); a few minutes on 2 CPU cores.
#   scripts/demo.sh [--out DIR] [--model DIR] [--train-count N] [--test-count N]
#                   [--rpn-epochs N] [--device cuda]
# The full-size run behind the README's numbers: python -m sdrpn.synth run --out outputs/synth
set -euo pipefail
# A relative --out or --model names a path under the directory the demo was started from, as
# any command's would, though the demo runs from the repository root (a leading ~ is left to
# the command, which takes it as home).
# `out` is where the run writes: the last --out given, as argparse takes it.
caller=$PWD
relative() { [[ -n $1 && $1 != /* && $1 != "~"* ]]; }
args=("$@")
out=outputs/demo
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
  --out | --model)
    ((i + 1 < ${#args[@]})) && relative "${args[i + 1]}" && args[i + 1]=$caller/${args[i + 1]}
    [[ ${args[i]} == --out ]] && out=${args[i + 1]:-$out}
    ;;
  --out=* | --model=*)
    flag=${args[i]%%=*} value=${args[i]#*=}
    relative "$value" && args[i]=$flag=$caller/$value
    [[ $flag == --out ]] && out=${args[i]#--out=}
    ;;
  esac
done
cd "$(dirname "$0")/.."
relative "$out" && out=$PWD/$out  # the default, in the repository: named whole, wherever the caller is
echo "demo: checking the environment (a first run installs it: several minutes)" >&2
SDRPN_EVAL=${SDRPN_EVAL:-0} scripts/setup.sh >/dev/null  # the demo needs no lmms-eval
source "${SDRPN_VENV:-.venv}/bin/activate"
python -m sdrpn.synth run --out outputs/demo --train-count 1000 --test-count 96 --rpn-epochs 3 \
  --title "SD-RPN demo: the synthetic fine-detail task" "${args[@]}"
echo "report: $out/report.md (examples.png, metrics.json beside it)"
