#!/usr/bin/env bash
# Set up benchmarks/.venv-peers: a virtual environment of its own for llm-compressor, which pins
# its own transformers (5.15-5.17 for 0.14.x) and compressed-tensors, apart from the project's
# .venv. Idempotent: an existing environment with the pinned versions is left as it is.
#
#   benchmarks/peers_setup.sh                 # then: .venv/bin/python benchmarks/peers.py
#   PYTHON=python3.11 benchmarks/peers_setup.sh
#
# Versions that worked together (CPU, Python 3.11, Linux x86_64):
#   llmcompressor 0.14.0.1 (requires torch >=2.10,<=2.14.0; transformers >=5.15,<=5.17;
#   compressed-tensors ==0.19.0), torch 2.13.0 (CPU build), transformers 5.17.0.
# PyTorch goes in first, pinned: a bare torch requirement from pip resolves to the multi-GB CUDA
# build where no CPU build is at hand; with torch already satisfied pip keeps it.
#   TORCH_SPEC='...' benchmarks/peers_setup.sh   # how to get torch 2.13.0 when it is not there
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${PEERS_VENV:-$HERE/.venv-peers}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
LLMCOMPRESSOR_VERSION="0.14.0.1"
TRANSFORMERS_VERSION="5.17.0"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

installed() {  # installed NAME VERSION: true if that exact version is installed in the venv
    [[ "$("$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p')" == "$2"* ]]
}

if installed torch "$TORCH_VERSION" && installed llmcompressor "$LLMCOMPRESSOR_VERSION" \
        && installed transformers "$TRANSFORMERS_VERSION"; then
    echo "$VENV is ready (torch $TORCH_VERSION, llmcompressor $LLMCOMPRESSOR_VERSION, transformers $TRANSFORMERS_VERSION)" >&2
    exit 0
fi

pip() { "$PY" -m pip --disable-pip-version-check -q "$@"; }
if ! installed torch "$TORCH_VERSION"; then
    # On a machine without a GPU the CPU build is wanted: here pip finds it on disk (the
    # machine's pip configuration); elsewhere pass TORCH_SPEC, e.g. with
    # '--index-url https://download.pytorch.org/whl/cpu torch==2.13.0'.
    # shellcheck disable=SC2086
    pip install ${TORCH_SPEC:-torch==$TORCH_VERSION}
fi
pip install "torch==$TORCH_VERSION" "llmcompressor==$LLMCOMPRESSOR_VERSION" \
    "transformers==$TRANSFORMERS_VERSION"
"$PY" - <<'EOF'
import importlib.metadata as m
print(", ".join(f"{p} {m.version(p)}" for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")))
EOF
