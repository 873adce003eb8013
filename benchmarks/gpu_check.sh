#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the `device` tool), in the repository root: install the
# project into the machine's Python, then the kernel benchmark, the decode benchmark and the GPU
# tests, each time-boxed, their output written to OUTDIR as it comes.
#   benchmarks/gpu_check.sh OUTDIR
# Python packages the machine lacks (pydantic; gemlite, a peer of the kernel benchmark) travel as
# wheels in .whl/ (the device tool's README: the machine has no registry).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
export PYTHONUNBUFFERED=1
py=python3
nvidia-smi -L | tee "$out/gpu.txt"
if ls .whl/*.whl >/dev/null 2>&1; then $py -m pip install -q --no-index --no-deps --no-compile .whl/*.whl; fi
$py -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
start=$(date +%s)
stamp() { echo "# $1 at $(( $(date +%s) - start )) s" | tee -a "$out/times.txt"; }

# Times on an H200 (2026-11-27): w4 about 20 s per 3 shapes x 3 M without GemLite installed
# (GemLite's own tuning adds minutes); decode about 90 s for bf16 + int4 through generate alone.
# The swapped-operand kernel (_mma_kernel) adds 3-4 candidates per M range to each row's tuning;
# the 2:4 rows tune our 2:4 kernels (float values, and 4-bit codes) against decompress + cuBLAS
# and cuSPARSELt. The decode runs come in the order of the goals: bf16 against int4 through
# both harnesses (the served loop compiles once more), then the 2:4 variants through the loop.
timeout 110 $py benchmarks/kernels.py --kernels w4g128 --shapes 11008x4096 4096x11008 8192x8192 14336x4096 \
    --ms 1 16 64 256 4096 > "$out/kernels.jsonl" 2> "$out/kernels_w4.err"
stamp "w4 kernels"
timeout 190 $py benchmarks/decode.py --variants bf16 int4 --harness loop generate > "$out/decode.jsonl" \
    2> "$out/decode.err"
stamp "decode bf16, int4"
timeout 30 $py benchmarks/kernels.py --kernels fp8 --shapes 11008x4096 4096x11008 8192x8192 \
    --ms 1 16 256 >> "$out/kernels.jsonl" 2> "$out/kernels_fp8.err"
stamp "fp8 kernels"
timeout 35 $py benchmarks/kernels.py --kernels sp24 --shapes 11008x4096 4096x11008 \
    --ms 1 16 256 4096 >> "$out/kernels.jsonl" 2> "$out/kernels_sp24.err"
stamp "2:4 bf16 kernels"
timeout 30 $py benchmarks/kernels.py --kernels sp24w4g128 --shapes 11008x4096 4096x11008 \
    --ms 1 16 256 4096 >> "$out/kernels.jsonl" 2> "$out/kernels_sp24w4.err"
stamp "2:4 + int4 kernels"
timeout 90 $py benchmarks/decode.py --variants sp24 sp24-int4 --harness loop >> "$out/decode.jsonl" \
    2> "$out/decode_sp24.err"
stamp "decode 2:4"
# the GPU-only tests first (large layers, FP8 ones too, nothing rejected by the tuner, inductor +
# CUDA graphs, cuSPARSELt), then the kernels' interpreter tests compiled for this GPU in fp16 and bf16
timeout 45 $py -m pytest -q tests/cuda tests/sparsity/test_layers.py -p no:cacheprovider -m gpu \
    -k "not replays_cuda_graphs" > "$out/tests.log" 2>&1
timeout 25 $py -m pytest -q tests/cuda -p no:cacheprovider -m "not gpu" -k "choice or mma or sp24" \
    > "$out/tests_kernels.log" 2>&1
# the static decoder through CUDA graphs on small models (decode.py ran it at full size above)
timeout 30 $py -m pytest -q tests/cuda/test_decode_benchmark.py -p no:cacheprovider -m gpu \
    > "$out/tests_decoder.log" 2>&1
stamp "tests"
tail -3 "$out/tests.log" "$out/tests_kernels.log" "$out/tests_decoder.log"
cat "$out/kernels.jsonl" "$out/decode.jsonl"
tail -4 "$out/decode.err" "$out/decode_sp24.err"
