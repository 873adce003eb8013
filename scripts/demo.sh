#!/usr/bin/env bash
# The main job on a fresh machine: set up, prepare the default real model, run the example
# pipeline (4-bit round-to-nearest) and print its evaluation table. Extra arguments go to
# `compress run` (e.g. --set steps.0.bits=3 -o out/smollm2-int3).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/compress models prepare smollm2-135m >&2  # stdout carries only the run's output (--json)
.venv/bin/compress run examples/smollm2-gptq-int4.yaml --overwrite "$@"
