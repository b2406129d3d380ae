#!/usr/bin/env bash
# The GPU check: on a CUDA machine with torch and Triton only (no vLLM, no network), run the
# steer kernel's tests for real (compiled, not interpreted) and the kernel micro-benchmark.
# Usage, from the repo root: benchmarks/gpu_check.sh OUTDIR     (about 3-5 minutes on an H100)
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$out/env.txt" 2>&1
# --noconftest: the suite's conftest serves the vLLM tests and imports what this machine lacks.
timeout 240 "$py" -m pytest tests/test_kernel_triton.py -q -p no:cacheprovider --noconftest 2>&1 | tee "$out/kernel_tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 300 "$py" benchmarks/kernel_bench.py "$out" 2>&1 | tee "$out/kernel_bench.log"
bench_rc=${PIPESTATUS[0]}
echo "kernel tests rc=$tests_rc, benchmark rc=$bench_rc" | tee -a "$out/env.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
