#!/usr/bin/env bash
# Retrains the synthetic task's base model exactly as the shipped one in
# python/sdrpn/synth/base_model/ was made (its train_base_config.json and history.jsonl
# record the run), then exports it there: float16 weights, the tokenizer, the preset of the
# layers SD-RPN reads, and the training record. About 75 minutes on 2 CPU cores with bf16
# instructions (the shipped run used bf16 autocast; on an AVX2-only CPU oneDNN has no bf16
# kernels and the same steps take about 12x longer; --no-bf16 runs them in float32 there,
# close to but not bit for bit the shipped run; its recipe had no colour loss); on a GPU
# pass --device cuda --batch-size 256 --workers 12 for the larger recipe (minutes).
# The shipped run set 4500 steps, stopped at its step-1000 checkpoint and resumed with 5500
# (the cosine schedule's end moved; steps before 1000 had a slightly lower learning rate
# than a run started with 5500). The preset comes from `python -m sdrpn.synth inspect`:
# layer 2 has the answer attention's argmax on the tag most often; layer 1's few tokens
# above 0.1 are the sinks.
#   scripts/train_synth_base.sh [train-base options...]
set -euo pipefail
cd "$(dirname "$0")/.."
source "${SDRPN_VENV:-.venv}/bin/activate"
out=outputs/synth_base
python -m sdrpn.synth train-base --out "$out" --steps 5500 --batch-size 32 --workers 1 --seed 0 \
  --save-every 250 --bf16 --colour-weight 0 --resume "$@"
python -m sdrpn.synth export-base --model "$out" --to python/sdrpn/synth/base_model \
  --grounding-layer 2 --sink-layer 1 --sink-threshold 0.1 --branch-layer 3 --depth 2
