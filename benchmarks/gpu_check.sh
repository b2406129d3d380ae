#!/usr/bin/env bash
# The GPU check for the Triton steer kernel, for a CUDA machine with torch and Triton only
# (no vLLM, no network, nothing to install). Run from anywhere; it works from the repo root:
#
#     benchmarks/gpu_check.sh OUTDIR
#
# 1. tests/test_kernel_triton.py on the GPU, compiled (TRITON_INTERPRET unset): with pytest if
#    it is installed (--noconftest: the suite's conftest imports vLLM), else the module's own
#    runner (python tests/test_kernel_triton.py);
# 2. benchmarks/kernel_bench.py OUTDIR: the micro-benchmark and a config sweep;
# 3. where transformers, tokenizers and safetensors are installed: training on CUDA against CPU
#    (tests/test_training.py -k cuda, under 2 min).
# Everything lands in OUTDIR: env.txt, kernel_tests.log, kernel_bench.{log,json,md}, training_cuda.log, summary.txt.
# Time: tests <= 240 s (about 75 kernel variants to compile), benchmark <= 200 s: under 8 min.
set -uo pipefail

out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 2
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

py=""
for candidate in "${PYTHON:-}" python3 python; do
    if [ -n "$candidate" ] && "$candidate" -c "import torch, triton" 2>/dev/null; then py=$candidate; break; fi
done
if [ -z "$py" ]; then echo "no python with torch and triton found" | tee "$out/summary.txt"; exit 2; fi

{
    date -u
    git rev-parse HEAD 2>/dev/null || true
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv 2>&1 || true
    "$py" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')"
    "$py" -c "import pytest; print('pytest', pytest.__version__)" 2>/dev/null || echo "pytest: not installed (using the module's runner)"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

echo "== kernel tests (compiled on the GPU)"
start=$(date +%s)
if "$py" -c "import pytest" 2>/dev/null; then
    timeout 240 "$py" -m pytest tests/test_kernel_triton.py -q -rfE -p no:cacheprovider --noconftest \
        --junitxml="$out/kernel_tests.xml" 2>&1 | tee "$out/kernel_tests.log"
    tests_rc=${PIPESTATUS[0]}
else
    timeout 240 "$py" tests/test_kernel_triton.py 2>&1 | tee "$out/kernel_tests.log"
    tests_rc=${PIPESTATUS[0]}
fi
tests_s=$(( $(date +%s) - start ))

echo "== micro-benchmark"
start=$(date +%s)
timeout 200 "$py" benchmarks/kernel_bench.py "$out" --budget-s 140 --sweep-budget-s 35 2>&1 | tee "$out/kernel_bench.log"
bench_rc=${PIPESTATUS[0]}
bench_s=$(( $(date +%s) - start ))

echo "== training on CUDA vs CPU (issue 4; needs transformers, tokenizers and safetensors there)"
if "$py" -c "import pytest, transformers, tokenizers, safetensors" 2>/dev/null; then
    timeout 120 "$py" -m pytest tests/test_training.py -k cuda -q -rs -p no:cacheprovider --noconftest \
        2>&1 | tee "$out/training_cuda.log"
    train_rc=${PIPESTATUS[0]}
else
    echo "skipped: pytest, transformers, tokenizers or safetensors missing" | tee "$out/training_cuda.log"
    train_rc=skipped
fi

{
    echo "training on CUDA: rc=$train_rc"
    echo "kernel tests: rc=$tests_rc (${tests_s} s; 124 = timed out)"
    tail -n 1 "$out/kernel_tests.log"
    echo "benchmark: rc=$bench_rc (${bench_s} s; 124 = timed out, partial results kept in kernel_bench.json/md)"
} | tee "$out/summary.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
