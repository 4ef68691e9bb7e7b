#!/usr/bin/env bash
# Checks kdkernels' GPU path on a machine with an NVIDIA GPU (torch with CUDA, triton, nvcc and
# ninja installed; no internet needed) and benchmarks it, in under 8 minutes:
#   1. environment: GPU, driver, python / torch / triton / nvcc versions;
#   2. Liger-Kernel from a local wheel when it is not installed (LIGER_WHEEL=path, or a
#      liger_kernel-*.whl in wheels/); without one, its rows read n/a;
#   3. builds the compiled kernels in place: the default-ISA CPU module (it carries the op schemas)
#      and the CUDA module (KDKERNELS_BUILD_CUDA=1);
#   4. the GPU tests (tests/test_gpu.py, tests/test_gpu_sync.py: no host sync, CUDA-graph capture
#      of a compiled step; tests/test_fused_linear_gpu.py: float32 chunk logits, CUDA gradient in
#      place; the GPU cases of tests/test_cakd_triton.py);
#   5. the benchmark (benchmarks/gpu_bench.py): fwd+bwd at bf16, N=8192 V=128256: kd_loss (forward
#      KL, JSD; % of the measured device copy bandwidth), cakd_loss / dkd_loss and sparse_kd_loss
#      (% copy), fused_linear_kd_loss at H=4096 (% of the measured bf16 matmul throughput, gradient
#      error against float64), each beside eager PyTorch, torch.compile and Liger-Kernel where it
#      has the loss; then, time allowing, N=4096 V=32000 and a sweep of the Triton launch shapes.
# A failing step is recorded and the next one runs; GPU_CHECK_BUDGET_S (default 470) bounds the
# whole check. Results in $OUT (default ./gpu_results): summary.md (step status + benchmark
# tables), one log per step, gpu_bench.md / gpu_bench.json.
#
#   bash benchmarks/gpu_check.sh
#   OUT=/tmp/gpu_results bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python}
TOTAL_BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
STARTED=$(date +%s)
SUMMARY="$OUT/summary.md"
echo "# kdkernels GPU check" > "$SUMMARY"
echo >> "$SUMMARY"

elapsed() { echo $(( $(date +%s) - STARTED )); }
remaining() { echo $(( TOTAL_BUDGET_S - $(elapsed) )); }

# step NAME LIMIT_S COMMAND...: runs COMMAND with a time limit, its output in $OUT/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  if [ "$limit" -lt 10 ]; then
    echo "- $name: skipped (time budget spent)" | tee -a "$SUMMARY"
    return 1
  fi
  echo "== $name (limit ${limit}s, at $(elapsed)s)" >&2
  local begin=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - begin ))
  local status="ok"
  [ $rc -ne 0 ] && status="FAILED (exit $rc$([ $rc -eq 124 ] && echo ', timed out'))"
  echo "- $name: $status in ${took}s (log: $name.log)" | tee -a "$SUMMARY"
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /' >&2
  return $rc
}

environment() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
  "$PYTHON" -c "import triton; print('triton', triton.__version__)" || true
  nvcc --version | tail -n 2 || true
  "$PYTHON" -c "import liger_kernel; print('liger-kernel', liger_kernel.__file__)" || echo "liger-kernel not installed"
}

install_liger() {
  if "$PYTHON" -c "import liger_kernel" 2>/dev/null; then
    echo "liger-kernel already installed"
    return 0
  fi
  local wheel=""
  for candidate in ${LIGER_WHEEL:-} wheels/liger_kernel-*.whl; do
    [ -f "$candidate" ] && wheel=$candidate && break
  done
  if [ -z "$wheel" ]; then
    echo "liger-kernel is not installed and no wheel was given (LIGER_WHEEL or wheels/): Liger rows will read n/a"
    return 0
  fi
  "$PYTHON" -m pip install --no-index --no-deps "$wheel"
}

build() {
  # The default-ISA CPU module is enough for the GPU path (it declares the op schemas the CUDA
  # module implements); nvcc compiles the two gencode targets in parallel.
  KDKERNELS_CPU_ISAS=default KDKERNELS_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
    NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} --threads 0" \
    "$PYTHON" setup.py build_ext --inplace --build-temp build/gpu-check &&
    "$PYTHON" -c "import kdkernels; info = kdkernels.backend_info(); print(info); assert info['cuda_build'], 'kdkernels._C_cuda did not load'"
}

export PYTHON
export -f environment install_liger build
step environment 60 bash -c environment
step liger 60 bash -c install_liger
step build 270 bash -c build
step gpu-tests $(( $(remaining) - 200 > 150 ? 150 : $(remaining) - 200 )) \
  "$PYTHON" -m pytest -q --maxfail=10 -p no:cacheprovider tests/test_gpu.py tests/test_gpu_sync.py \
  tests/test_fused_linear_gpu.py tests/test_cakd_triton.py -k "not interpreter_cases and not compiles"
# gpu_bench starts no configuration after its --time-budget and gives the last one at most a
# minute more; it rewrites its tables after every configuration.
BENCH_LIMIT=$(( $(remaining) - 5 ))
step benchmark "$BENCH_LIMIT" \
  "$PYTHON" -m benchmarks.gpu_bench --shapes 8192x128256,4096x32000 --divergences forward_kl,jsd \
  --families kd,cakd,sparse,fused_linear --hidden 4096 --child-timeout 90 \
  --sweep --out "$OUT" --time-budget $(( BENCH_LIMIT > 90 ? BENCH_LIMIT - 70 : 20 ))

{
  echo
  echo "Environment:"
  echo '```'
  cat "$OUT/environment.log"
  echo '```'
  echo
  grep -E "passed|failed|error" "$OUT/gpu-tests.log" | tail -n 1 | sed 's/^/GPU tests: /'
  echo
  [ -f "$OUT/gpu_bench.md" ] && cat "$OUT/gpu_bench.md"
  echo
  echo "Total: $(elapsed)s"
} >> "$SUMMARY"
cat "$SUMMARY"
