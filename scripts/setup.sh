#!/usr/bin/env bash
# Set up a virtual environment with the CPU build of PyTorch and the project.
#   bash scripts/setup.sh [extras]      (default extras: train,test,trl — the TRL integration test runs in CI;
#                                        test includes transformers serve, the real server of tests/test_served_real.py)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-train,test,trl}"
python3 -m venv .venv
# torch first, pinned: an unpinned torch would resolve to a multi-GB CUDA build on CPU machines.
.venv/bin/pip install --quiet "torch==2.13.0"
# -c pins the versions CI was run with (transformers inside the range vLLM accepts).
.venv/bin/pip install --quiet -c scripts/constraints.txt -e ".[$extras]"
echo "setup: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
