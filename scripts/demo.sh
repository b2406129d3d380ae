#!/usr/bin/env bash
# The main job: set up .venv if needed, then serve the default model with the shipped steers
# and show the same prompts at several steer values side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh
exec .venv/bin/python scripts/demo.py
