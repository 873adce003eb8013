#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the `device` tool), in the repository root: install the
# project into the machine's Python, then the kernel benchmark, the decode benchmark and the GPU
# kernel tests, each time-boxed, their output written to OUTDIR as it comes.
#   benchmarks/gpu_check.sh OUTDIR
# Python packages the machine lacks (pydantic) travel as wheels in .whl/ (the device tool's README).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
export PYTHONUNBUFFERED=1
py=python3
nvidia-smi -L | tee "$out/gpu.txt"
if ls .whl/*.whl >/dev/null 2>&1; then $py -m pip install -q --no-index --no-deps --no-compile .whl/*.whl; fi
$py -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1

timeout 130 $py benchmarks/kernels.py --kernels w4g128 --shapes 11008x4096 4096x11008 8192x8192 4096x4096 \
    --ms 1 4 16 64 256 4096 > "$out/kernels.jsonl" 2> "$out/kernels_w4.err"
timeout 50 $py benchmarks/kernels.py --kernels w8g128 --shapes 11008x4096 4096x11008 8192x8192 \
    --ms 1 16 256 >> "$out/kernels.jsonl" 2> "$out/kernels_w8.err"
timeout 190 $py benchmarks/decode.py > "$out/decode.jsonl" 2> "$out/decode.err"
timeout 70 $py -m pytest -q -x tests/cuda -p no:cacheprovider -k "gemv or dot_kernel or large or inductor or choice or tinygemm" \
    > "$out/tests.log" 2>&1
tail -3 "$out/tests.log"
cat "$out/kernels.jsonl" "$out/decode.jsonl"
tail -4 "$out/decode.err"
