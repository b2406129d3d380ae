#!/usr/bin/env bash
# The test command: set up .venv if needed, lint, then run the whole suite on CPU
# (the real vLLM engine on the real default model; Triton kernels under its interpreter).
# Arguments go to pytest (`scripts/test.sh -m "not slow"`: the quick subset). Every run ends with its
# slowest tests and its server start-ups (tests/conftest.py), so that the suite's cost stays in view.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh
.venv/bin/ruff check .
set +e
.venv/bin/python -m pytest --durations=25 --durations-min=1 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating that as a failure" >&2
    exit 1
fi
exit "$rc"
