#!/usr/bin/env bash
# The GPU check for the Triton steer kernels, for a CUDA machine with torch and Triton (no vLLM,
# no network, nothing to install, pytest optional), from a raw checkout (vllm_steer need not be
# installed). Run from anywhere:
#
#     benchmarks/gpu_check.sh OUTDIR
#
# 1. tests/test_kernel_triton.py on the GPU, compiled (TRITON_INTERPRET unset): with pytest if it
#    is installed (--noconftest: the suite's conftest needs vLLM), else the module's own runner;
# 2. benchmarks/kernel_bench.py OUTDIR: the gather kernel on 256 rows over 1, 8, 64 and 256 distinct
#    steers of a 256-steer bank (D = 4096, rank 64 and 1000, K = 2): warm-up compile times, time
#    against the bandwidth floor, the 64-steers / 1-steer ratio, a CUDA-graph replay check with new
#    per-row steers and values, a short config sweep; results rewritten after every point;
# 3. where transformers, tokenizers and safetensors are installed: training on CUDA against CPU
#    (tests/test_training.py -k cuda).
# Worst case under 8 minutes: every step runs under `timeout` (1: 200 s, for about 105 kernel
# variants to compile; 2: 170 s; 3: 80 s; set-up about 10 s).
# Exit status: 1 for a real failure (a test failed or timed out, the benchmark crashed), 2 when
# torch/Triton/vllm_steer cannot be imported, else 0; a benchmark cut short by its timeout keeps
# its partial results and is not a failure.
# Everything lands in OUTDIR: env.txt, kernel_tests.log, kernel_bench.{log,json,md},
# kernel_bench_summary.md, training_cuda.log, summary.txt.
set -uo pipefail

out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 2
repo=$(pwd)
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TRITON_CACHE_DIR="$out/triton_cache"  # fresh: the compile counts below are this run's
rm -rf "$TRITON_CACHE_DIR"

# `vllm_steer.kernels` from this checkout without installing it: a package directory mirroring
# the installed layout (setup.py's package_dir), made of symlinks.
layout=$(mktemp -d)
trap 'rm -rf "$layout"' EXIT
mkdir -p "$layout/vllm_steer"
for entry in vllm_steer/*; do
    ln -s "$repo/$entry" "$layout/vllm_steer/$(basename "$entry")"
done
ln -sfn "$repo/kernels" "$layout/vllm_steer/kernels"
export PYTHONPATH="$layout${PYTHONPATH:+:$PYTHONPATH}"
# Python puts the working directory first on sys.path for -c and -m: in the repo root that would
# be the real vllm_steer/ (no kernels/ inside), so every step runs from the layout directory.
cd "$layout" || exit 2

py=""
for candidate in "${PYTHON:-}" python3 python; do
    if [ -n "$candidate" ] && "$candidate" -c "import torch, triton" 2>/dev/null; then py=$candidate; break; fi
done
if [ -z "$py" ]; then echo "no python with torch and triton found" | tee "$out/summary.txt"; exit 2; fi
if ! "$py" -c "import vllm_steer.kernels.triton_ops" 2>"$out/import_error.txt"; then
    echo "cannot import vllm_steer.kernels from the checkout (see import_error.txt):" | tee "$out/summary.txt"
    tail -n 3 "$out/import_error.txt" | tee -a "$out/summary.txt"
    exit 2
fi

{
    date -u
    git -C "$repo" rev-parse HEAD 2>/dev/null || true
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv 2>&1 || true
    "$py" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')"
    "$py" -c "import vllm_steer.kernels as k; print('vllm_steer.kernels from', k.__file__)"
    "$py" -c "import pytest; print('pytest', pytest.__version__)" 2>/dev/null || echo "pytest: not installed (using the module's runner)"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

compiled() {  # kernels compiled so far in this run (one cache entry each)
    find "$TRITON_CACHE_DIR" -name '*.cubin' 2>/dev/null | wc -l
}

echo "== kernel tests (compiled on the GPU)"
start=$(date +%s)
if "$py" -c "import pytest" 2>/dev/null; then
    timeout 200 "$py" -m pytest "$repo/tests/test_kernel_triton.py" --rootdir "$repo" -q -rfE -p no:cacheprovider \
        --noconftest --junitxml="$out/kernel_tests.xml" 2>&1 | tee "$out/kernel_tests.log"
    tests_rc=${PIPESTATUS[0]}
else
    timeout 200 "$py" "$repo/tests/test_kernel_triton.py" 2>&1 | tee "$out/kernel_tests.log"
    tests_rc=${PIPESTATUS[0]}
fi
tests_s=$(( $(date +%s) - start ))
tests_compiled=$(compiled)

echo "== micro-benchmark"
start=$(date +%s)
timeout 170 "$py" "$repo/benchmarks/kernel_bench.py" "$out" --budget-s 120 --sweep-budget-s 25 2>&1 | tee "$out/kernel_bench.log"
bench_rc=${PIPESTATUS[0]}
bench_s=$(( $(date +%s) - start ))
bench_compiled=$(( $(compiled) - tests_compiled ))

echo "== training on CUDA vs CPU (needs transformers, tokenizers and safetensors there)"
if "$py" -c "import pytest, transformers, tokenizers, safetensors" 2>/dev/null; then
    timeout 80 "$py" -m pytest "$repo/tests/test_training.py" --rootdir "$repo" -k cuda -q -rs -p no:cacheprovider \
        --noconftest 2>&1 | tee "$out/training_cuda.log"
    train_rc=${PIPESTATUS[0]}
else
    echo "skipped: pytest, transformers, tokenizers or safetensors missing" | tee "$out/training_cuda.log"
    train_rc=skipped
fi

verdict() {  # rc allow_timeout -> a word
    case "$1" in
        0) echo "ok" ;;
        skipped) echo "skipped" ;;
        124) if [ "$2" = yes ]; then echo "timed out (partial results kept)"; else echo "TIMED OUT (failure)"; fi ;;
        *) echo "FAILED (rc=$1)" ;;
    esac
}
{
    echo "kernel tests: $(verdict "$tests_rc" no), ${tests_s} s, ${tests_compiled} kernels compiled"
    tail -n 1 "$out/kernel_tests.log"
    echo "benchmark: $(verdict "$bench_rc" yes), ${bench_s} s, ${bench_compiled} kernels compiled"
    echo "training on CUDA: $(verdict "$train_rc" no)"
    echo
    if [ -f "$out/kernel_bench_summary.md" ]; then cat "$out/kernel_bench_summary.md"; else echo "(no benchmark summary)"; fi
} | tee "$out/summary.txt"
failed=0
for pair in "$tests_rc:no" "$bench_rc:yes" "$train_rc:no"; do
    rc=${pair%%:*} allow=${pair##*:}
    case "$rc" in 0|skipped) ;; 124) [ "$allow" = yes ] || failed=1 ;; *) failed=1 ;; esac
done
exit "$failed"
