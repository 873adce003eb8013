#!/usr/bin/env bash
# Set up, then run the whole test suite (unit, CLI, and the real-model integration tests).
# Extra arguments go to pytest (e.g. -m "not slow" for the fast tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m pytest -ra "$@"
