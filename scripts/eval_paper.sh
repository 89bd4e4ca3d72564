#!/usr/bin/env bash
# The paper's evaluation (SPEC "Evaluation protocol") through lmms-eval: every task the
# reference reports, answered by LLaVA-1.5 with SD-RPN at that benchmark's RoI threshold
# (task_preset) and by the same model without RoI (the baseline row), then one Markdown
# table of all scores (OUT/results.md).
#
#   scripts/eval_paper.sh --rpn RPN [--model llava-hf/llava-1.5-7b-hf] [--out outputs/paper]
#       [--tasks "textvqa_val pope ..."] [--rows "baseline sdrpn"] [--batch-size 1]
#       [--dtype fp16] [--crop-mode mask|bbox] [--limit N] [--dry-run]
#
# What it needs:
#   - the eval extra: scripts/setup.sh installs lmms-eval 0.7.3 into .venv on the pinned
#     torch (or: pip install -c requirements.txt ".[eval]"); PYTHON names another interpreter;
#   - a CUDA GPU (a 7B model in fp16 takes about 15 GB);
#   - the base model (a llava-hf folder or Hub id) and the RPN (`sdrpn train --out` or
#     `sdrpn import-checkpoint --out` folder, or a Hub id);
#   - the data sets, which lmms-eval reads from the Hugging Face Hub (lmms-lab-encoder/textvqa,
#     lmms-lab-encoder/DocVQA, echo840/OCRBench, DreamMr/HR-Bench, ...): downloaded into
#     HF_HOME on first use, some gated (log in with `hf auth login`); with HF_HUB_OFFLINE=1
#     only that cache is read;
#   - HR-Bench scores every answer through OpenAI's API: OPENAI_API_KEY (without it drop
#     hrbench4k and hrbench8k from --tasks).
# The reference evaluates batch 1, greedy, fp16 (the defaults); --batch-size N is faster,
# and its padding may change a few fp16 answers. A (row, task) whose results are already in
# OUT is not run again: rerun after an interruption, or delete OUT/ROW/TASK to redo one.
# The tasks, their benchmark, RoI threshold and score: python -m sdrpn.integrations.paper tasks
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  [ -x "${SDRPN_VENV:-$ROOT/.venv}/bin/python" ] && PYTHON="${SDRPN_VENV:-$ROOT/.venv}/bin/python"
fi

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  echo
  echo "task benchmark threshold score:"
  "$PYTHON" -m sdrpn.integrations.paper tasks 2>/dev/null || echo "  (sdrpn is not importable with $PYTHON)"
}

MODEL=llava-hf/llava-1.5-7b-hf RPN="" OUT=outputs/paper TASKS="" ROWS="baseline sdrpn"
BATCH=1 DTYPE=fp16 CROP="" LIMIT="" DRY=0
while (($#)); do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --rpn) RPN=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --tasks) TASKS=$2; shift 2 ;;
    --rows) ROWS=$2; shift 2 ;;
    --batch-size) BATCH=$2; shift 2 ;;
    --dtype) DTYPE=$2; shift 2 ;;
    --crop-mode) CROP=$2; shift 2 ;;
    --limit) LIMIT=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "eval_paper.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$RPN" ]; then
  echo "eval_paper.sh: --rpn is required (an RPN folder or Hub id; see --help)" >&2
  exit 2
fi
for row in $ROWS; do
  case "$row" in baseline|sdrpn) ;; *) echo "eval_paper.sh: --rows takes baseline and sdrpn, got $row" >&2; exit 2 ;; esac
done

declare -A BENCHMARK
ALL=""
while read -r task benchmark _; do BENCHMARK[$task]=$benchmark; ALL="$ALL $task"; done \
  < <("$PYTHON" -m sdrpn.integrations.paper tasks)
TASKS=${TASKS:-$ALL}
for task in $TASKS; do
  [ -n "${BENCHMARK[$task]:-}" ] || { echo "eval_paper.sh: $task is not one of the paper's tasks:$ALL" >&2; exit 2; }
done

common="pretrained=$MODEL,rpn=$RPN,dtype=$DTYPE"
for task in $TASKS; do
  for row in $ROWS; do
    dest="$OUT/$row/$task"
    if compgen -G "$dest/*/*_results.json" >/dev/null; then
      echo "[eval_paper] $row $task: done already ($dest)"
      continue
    fi
    if [ "$row" = sdrpn ]; then
      args="$common,task_preset=${BENCHMARK[$task]}${CROP:+,crop_mode=$CROP}"
    else
      args="$common,roi=false"  # the RPN folder's prompt template and preprocessing, no crops
    fi
    cmd=("$PYTHON" -m lmms_eval --model sdrpn_llava --model_args "$args" --tasks "$task"
         --batch_size "$BATCH" --output_path "$dest" --log_samples ${LIMIT:+--limit "$LIMIT"})
    echo "[eval_paper] $row $task: ${cmd[*]}"
    ((DRY)) || "${cmd[@]}"
  done
done
((DRY)) && exit 0
"$PYTHON" -m sdrpn.integrations.paper table "$OUT" --out "$OUT/results.md"
echo "[eval_paper] table: $OUT/results.md"
