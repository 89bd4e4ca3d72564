#!/usr/bin/env bash
# On the GPU machine: its python3 already has torch with CUDA; there is no network, so
# nothing is downloaded (scripts/gpu_prepare.sh, run beforehand elsewhere, fills
# .gpu_carry/). Builds the extension and the C++ suite with CUDA for this GPU's
# architecture, runs the CUDA tests and the benchmarks, and leaves three files under $OUT:
# results.json (every benchmark's JSON), summary.txt (each step's tail) and logs.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/build/gpu_check_out}
LOGS=$ROOT/build/gpu_check
rm -rf "$LOGS"
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
failed=()

step() {  # step NAME COMMAND...: run, keep the log, show its tail, remember failures
  local name=$1; shift
  local start=$SECONDS
  echo "=== $name"
  "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$LOGS/$name.log"
  echo "=== $name: rc=$rc in $((SECONDS - start)) s" | tee -a "$LOGS/steps.txt"
  [ $rc -eq 0 ] || failed+=("$name")
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOGS/gpu.txt"
arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export SDRPN_CUDA_ARCHS=${SDRPN_CUDA_ARCHS:-$arch} TORCH_CUDA_ARCH_LIST=${SDRPN_CUDA_ARCHS:-$arch}
echo "arch $SDRPN_CUDA_ARCHS, $(python3 -c 'import torch; print(torch.__version__)')"

if ls .gpu_carry/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/sdrpn_site .gpu_carry/wheels/*.whl
  export PYTHONPATH=/tmp/sdrpn_site
fi
export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}

step build_python env SDRPN_FORCE_CUDA=1 python3 setup.py build_ext --inplace
gtest_arg=()
[ -d .gpu_carry/googletest ] && gtest_arg=(-DSDRPN_GTEST_SOURCE_DIR="$ROOT/.gpu_carry/googletest")
step build_cpp bash -c "cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython3_EXECUTABLE=$(command -v python3) -DSDRPN_WITH_CUDA=ON -DSDRPN_CUDA_ARCHS=$SDRPN_CUDA_ARCHS \
  ${gtest_arg[*]} && cmake --build build/gpu -j $MAX_JOBS"
step ctest ctest --test-dir build/gpu --output-on-failure --no-tests=error
step pytest python3 -m pytest tests/python -q -p no:cacheprovider -x
for dev in cuda cpu; do
  step "bench_labels_$dev" python3 benchmarks/bench_labels.py --device $dev --json "$LOGS/bench_labels_$dev.json"
  step "bench_sinks_$dev" python3 benchmarks/bench_sinks.py --device $dev --json "$LOGS/bench_sinks_$dev.json"
  step "bench_rpn_scores_$dev" python3 benchmarks/bench_rpn_scores.py --device $dev --json "$LOGS/bench_rpn_scores_$dev.json"
done
step bench_train_rpn_7b python3 benchmarks/bench_train_rpn.py --size 7b --device cuda --batch 8 \
  --json "$LOGS/bench_train_rpn_7b.json"
step bench_infer_7b python3 benchmarks/bench_infer.py --size 7b --device cuda \
  --json "$LOGS/bench_infer_7b.json"
step bench_label_pipeline_7b python3 benchmarks/bench_label_pipeline.py --size 7b --device cuda \
  --samples 32 --reference-samples 4 --answer-tokens 8 32 --batch-sizes 1 16 \
  --json "$LOGS/bench_label_pipeline_7b.json"

python3 - "$LOGS" "$OUT/results.json" <<'PY'
import glob, json, os, sys
logs, out = sys.argv[1], sys.argv[2]
merged = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(os.path.join(logs, "*.json")))}
json.dump(merged, open(out, "w"), indent=1)
PY
(cat "$LOGS/gpu.txt" "$LOGS/steps.txt"; for f in "$LOGS"/*.log; do echo "=== $f"; tail -n 40 "$f"; done) >"$OUT/summary.txt"
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .

if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "gpu_check: all steps passed"
