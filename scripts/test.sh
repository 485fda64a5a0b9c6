#!/usr/bin/env bash
# Set up (if needed) and run the test suite (fast tests; `-m slow` for the long ones).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && .venv/bin/python -c "import cv_env, torch, transformers, pytest" 2>/dev/null \
  || bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
exec .venv/bin/python -m pytest "$@"
