#!/usr/bin/env bash
# On the GPU machine: its python3 already has torch with CUDA; there is no network, so
# nothing is downloaded (scripts/gpu_prepare.sh, run beforehand elsewhere, fills
# .gpu_carry/). Builds the extension for this GPU's architecture only, then runs, most
# important first, each within its own time budget: the CUDA tests of the graph decoder
# and the host waits (what the pipeline benchmarks rest on, a minute at most), the 7B
# pipeline benchmarks (answering, labelling, RPN training), the CPU kernels at full thread
# count, the other CUDA tests, the op benchmarks, the label job on JPEG files and last the
# C++ suite. Keeps under $OUT, refreshed after every step so that a run cut short still
# reports: results.json (every benchmark's JSON), figures.md (the headline figures against
# their targets, benchmarks/figures.py), summary.txt (each step's tail), logs.tar.gz (logs
# and profiler tables) and traces_infer.tar.gz, traces_label.tar.gz (the profiler traces,
# apart: a few MB each, and a file over the 16 MiB a file the machine returns is lost whole).
#
# With SDRPN_TRAIN_BASE_STEPS=N it also trains the synthetic task's base model (N steps at
# batch 256) in the background after the timed steps, while the C++ suite builds and runs,
# scores it, and leaves it as $OUT/base_model.tar.gz.
# GPU_CHECK_SECONDS (default 540) bounds the whole run.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/build/gpu_check_out}
LOGS=$ROOT/build/gpu_check
rm -rf "$LOGS"
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))
failed=()

pack() {  # results.json, summary.txt and the archives from what the steps have left so far
  python3 - "$LOGS" "$OUT/results.json" <<'PY'
import glob, json, os, sys
logs, out = sys.argv[1], sys.argv[2]
merged = {}
for p in sorted(glob.glob(os.path.join(logs, "*.json"))):
    try:
        merged[os.path.basename(p)[:-5]] = json.load(open(p))
    except ValueError:
        pass
json.dump(merged, open(out, "w"), indent=1)
PY
  python3 benchmarks/figures.py "$OUT/results.json" >"$OUT/figures.md" 2>&1
  (cat "$LOGS/gpu.txt" "$LOGS/steps.txt" 2>/dev/null; for f in "$LOGS"/*.log; do echo "=== $f"; tail -n 40 "$f"; done) >"$OUT/summary.txt"
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" --exclude '*_trace.json.gz' .
  local dir
  for dir in "$LOGS"/*_profile; do
    ls "$dir"/*_trace.json.gz >/dev/null 2>&1 &&
      (cd "$LOGS" && tar -czf "$OUT/traces_$(basename "$dir" _profile).tar.gz" "$(basename "$dir")"/*_trace.json.gz)
  done
}

step() {  # step NAME BUDGET COMMAND...: run within its budget and the time left, keep the log
  local name=$1 budget=$2; shift 2
  local start=$SECONDS left=$((DEADLINE - SECONDS - 15))
  ((budget < left)) && left=$budget
  echo "=== $name"
  if ((left < 10)); then
    echo "=== $name: skipped, out of time" | tee -a "$LOGS/steps.txt"; failed+=("$name"); return
  fi
  timeout -k 5 "$left" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$LOGS/$name.log"
  echo "=== $name: rc=$rc in $((SECONDS - start)) s (budget $left s)" | tee -a "$LOGS/steps.txt"
  [ $rc -eq 0 ] || failed+=("$name")
  pack
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOGS/gpu.txt"
arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export SDRPN_CUDA_ARCHS=${SDRPN_CUDA_ARCHS:-$arch}
export TORCH_CUDA_ARCH_LIST=$SDRPN_CUDA_ARCHS
echo "arch $SDRPN_CUDA_ARCHS, $(python3 -c 'import torch; print(torch.__version__)')"

if ls .gpu_carry/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/sdrpn_site .gpu_carry/wheels/*.whl
  export PYTHONPATH=/tmp/sdrpn_site
fi
export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}

# The build gpu_prepare.sh carried, where this machine's Python, torch, sources and GPU are
# the ones it was built for and a kernel runs; otherwise a build here (minutes of this run).
abi=$(bash scripts/extension_abi.sh python3)
if [ "$SDRPN_CUDA_ARCHS" = 9.0 ] && [ "$(cat .gpu_carry/prebuilt/ABI 2>/dev/null)" = "$abi" ] &&
  cp .gpu_carry/prebuilt/_C*.so python/sdrpn/ &&
  python3 -c "import torch, sdrpn; assert sdrpn.build_info()['with_cuda']
sdrpn.ops.massive_activation_sinks(torch.randn(1, 8, 16, device='cuda', dtype=torch.float16), [0])
torch.cuda.synchronize()" >"$LOGS/prebuilt.log" 2>&1; then
  echo "=== build_python: the carried sm_90 build" | tee -a "$LOGS/steps.txt"
else
  rm -f python/sdrpn/_C*.so
  step build_python 300 env SDRPN_FORCE_CUDA=1 python3 setup.py build_ext --inplace
fi
python3 -c "import sdrpn; print(sdrpn.build_info())" | tee -a "$LOGS/gpu.txt"

# The CUDA cases (bad inputs included; tests/python/conftest.py marks every test that needs
# a GPU `cuda`, whatever its name); CI runs the rest on every change. Each named as it ends
# (-v), so that a run cut short says which passed; a hung test fails alone where
# pytest-timeout is there, and under pytest-xdist a test that kills its process is reported
# as a failure and the others run.
pytest_flags=(-v -p no:cacheprovider -m cuda)
python3 -c "import pytest_timeout" 2>/dev/null && pytest_flags+=(--timeout 60)
graph_tests=(tests/python/test_decode.py tests/python/test_host_syncs.py)
# First, the graph decoder, the image encoder's graphs, the stage timings and the host waits
# on this GPU: the answering and labelling figures below are taken through them.
step pytest_graphs 60 python3 -m pytest "${graph_tests[@]}" "${pytest_flags[@]}"

# The figures users choose a method by.
step bench_infer_7b 240 python3 benchmarks/bench_infer.py --size 7b --device cuda --answer-tokens 8 32 \
  --batch-sizes 1 8 --repeats 3 --profile "$LOGS/infer_profile" --json "$LOGS/bench_infer_7b.json"
step bench_label_pipeline_7b 150 python3 benchmarks/bench_label_pipeline.py --size 7b --device cuda \
  --samples 32 --reference-samples 4 --answer-tokens 8 32 --batch-sizes 1 32 \
  --profile "$LOGS/label_profile" --json "$LOGS/bench_label_pipeline_7b.json"
step bench_train_rpn_7b 90 python3 benchmarks/bench_train_rpn.py --size 7b --device cuda --batch 8 \
  --json "$LOGS/bench_train_rpn_7b.json"
# The CPU kernels at the machine's full thread count, against batched PyTorch.
step bench_labels_cpu 40 python3 benchmarks/bench_labels.py --device cpu --reference-samples 256 \
  --json "$LOGS/bench_labels_cpu.json"
step bench_sinks_cpu 40 python3 benchmarks/bench_sinks.py --device cpu --json "$LOGS/bench_sinks_cpu.json"
# cuDNN's attention against the kernels sdrpn runs (sdrpn.llava.attention_kernels says why).
step bench_attention_backends 40 python3 benchmarks/bench_attention_backends.py --device cuda \
  --json "$LOGS/bench_attention_backends.json"

xdist=()
python3 -c "import xdist" 2>/dev/null && xdist=(-n 4)
step pytest_cuda 150 python3 -m pytest tests/python "${pytest_flags[@]}" "${graph_tests[@]/#/--ignore=}" "${xdist[@]}"
for bench in bench_labels bench_sinks bench_rpn_scores; do
  step "${bench}_cuda" 30 python3 "benchmarks/$bench.py" --device cuda --json "$LOGS/${bench}_cuda.json"
done
step bench_rpn_scores_cpu 30 python3 benchmarks/bench_rpn_scores.py --device cpu --json "$LOGS/bench_rpn_scores_cpu.json"
# The label job end to end on JPEG files, with and without loader threads (the figure a
# user labelling a real dataset sees), where time is left.
step bench_label_job_7b 90 python3 benchmarks/bench_label_job.py --size 7b --device cuda --images 128 \
  --batch-size 16 --repeats 1 --json "$LOGS/bench_label_job_7b.json"

# After every timed step: its loader processes and its GPU work would share their machine.
train_pid=
if [ -n "${SDRPN_TRAIN_BASE_STEPS:-}" ] && [[ ! " ${failed[*]} " =~ " build_python " ]]; then
  budget=$(python3 -c "print(max(1, $DEADLINE - $SECONDS - 150) / 60)")
  python3 -m sdrpn.synth train-base --out build/base_model --steps "$SDRPN_TRAIN_BASE_STEPS" \
    --batch-size 256 --workers 12 --max-minutes "$budget" >"$LOGS/train_base.log" 2>&1 &
  train_pid=$!
fi

gtest_arg=()
[ -d .gpu_carry/googletest ] && gtest_arg=(-DSDRPN_GTEST_SOURCE_DIR="$ROOT/.gpu_carry/googletest")
step build_cpp 240 bash -c "cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython3_EXECUTABLE=$(command -v python3) -DSDRPN_WITH_CUDA=ON -DSDRPN_CUDA_ARCHS=$SDRPN_CUDA_ARCHS \
  ${gtest_arg[*]} && cmake --build build/gpu -j $MAX_JOBS"
step ctest 120 ctest --test-dir build/gpu --output-on-failure --no-tests=error

if [ -n "$train_pid" ]; then
  wait "$train_pid"
  rc=$?
  echo "=== train_base: rc=$rc" | tee -a "$LOGS/steps.txt"
  [ $rc -eq 0 ] || failed+=("train_base")
  step eval_base 120 python3 -m sdrpn.synth eval-base --model build/base_model --count 400 \
    --json "$LOGS/eval_base.json"
  tar -czf "$OUT/base_model.tar.gz" --exclude base_model/checkpoint -C build base_model
fi

pack
if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "gpu_check: all steps passed"
