#!/usr/bin/env bash
# Retrains the synthetic task's base model exactly as the shipped one in
# python/sdrpn/synth/base_model/ was made (its train_base_config.json records both stages,
# history_summary.json the second), then exports it there: float16 weights, the tokenizer,
# the preset of the layers SD-RPN reads, and the training record. Each stage resumes where
# it stopped (run the script again).
#
# Stage 1, everything from scratch: 5500 steps at batch 32, no colour loss. The shipped run
# used bf16 autocast on a CPU with bf16 instructions (about 75 minutes on 2 cores); bf16 is
# on wherever it is native, and on an AVX2-only CPU (no bf16 kernels in oneDNN) the stage runs
# in float32, about 62 minutes on 2 cores, close to but not bit for bit the shipped run. That
# run set 4500 steps, stopped at its step-1000 checkpoint and resumed with 5500 (the cosine
# schedule's end moved; steps before 1000 had a slightly lower learning rate than a run
# started with 5500).
# Stage 2, reading from crops: 6500 steps from stage 1's weights (float32, 70 minutes on 2
# AVX2 cores; both stages together stay under 2.5 hours there), 60% of batches with a second
# view, 90% of those on the tag and half of those cut on the encoder's grid cells as SD-RPN
# cuts its crops, 80% code questions in them; the code-character loss reads through the
# language model's output layer, the tag-cell loss also marks the tag in crops, and the
# colour loss is on.
# Both stages trained on the task's first generator, which placed the tag anywhere
# (--tag-clearance 0); the task now keeps it clear of clutter, a subset of those images.
# On a GPU pass --device cuda --workers 12 (minutes). The preset comes from
# `python -m sdrpn.synth inspect`: the heads its greedy selection picks ground (those whose
# answer attention, through SPEC's labelling rule, gives a box holding the tag most often),
# layer 1 marks the sinks.
#   scripts/train_synth_base.sh [train-base options for both stages...]
set -euo pipefail
cd "$(dirname "$0")/.."
source "${SDRPN_VENV:-.venv}/bin/activate"
first=outputs/synth_base
out=outputs/synth_base_read
python -m sdrpn.synth train-base --out "$first" --steps 5500 --batch-size 32 --workers 1 --seed 0 \
  --save-every 250 --colour-weight 0 --tag-clearance 0 --resume "$@"
python -m sdrpn.synth train-base --out "$out" --init "$first" --steps 6500 --batch-size 32 --workers 1 \
  --seed 1 --save-every 250 --no-bf16 --lr 3e-4 --zoom-fraction 0.6 --zoom-on-tag 0.9 --read-share-zoomed 0.8 \
  --cell-views 0.5 --char-head lm --crop-tag-weight 1 --colour-weight 1 --tag-clearance 0 --resume "$@"
python -m sdrpn.synth export-base --model "$out" --to python/sdrpn/synth/base_model \
  --grounding 2:3,4:1,1:1 --sink-layer 1 --sink-threshold 0.1 --branch-layer 3 --depth 2
