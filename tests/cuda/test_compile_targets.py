"""The Triton kernels compile to GPU code for Ampere (sm_80) and Hopper (sm_90a) without a GPU.

Triton's compiler runs on the CPU (its bundled ptxas included), so CI checks that every kernel,
for each weight width, zero-point mode, density (dense or 2:4) and, for the swapped-operand
kernel, activation type, for 2:4 float weights (BITS 16, the values themselves) and for FP8
weights (the GEMV and the dequantization, each activation type), lowers
through PTX to a cubin for both targets. The
check runs in a subprocess: this process has TRITON_INTERPRET=1, under which kernels are
interpreted and never compiled."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from compress.cuda import triton_fp8 as tf
from compress.cuda import triton_int as ti

KERNELS = {  # kernel -> (pointer/int arguments in order, constexprs)
    ti._dot_kernel: (["*bf16", "*i32", "*i32", "*fp16", "*u8", "*fp32"] + ["i32"] * 7,
                     dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, SPLIT_K=4, FP32=False)),
    ti._dequant_kernel: (["*i32", "*i32", "*fp16", "*u8", "*bf16", "i32", "i32", "i32", "i32"],
                         dict(BLOCK_N=32, BLOCK_K=128)),
}
GEMV = ["*bf16", "*i32", "*fp16", "*u8", "*bf16", "i32", "i32", "i32", "i32"]
SP24_GEMV = ["*bf16", "*i32", "*i32", "*fp16", "*u8", "*bf16", "i32", "i32", "i32", "i32"]  # + magic for codes
MMA = (["*i32", "*i32", "*fp16", "*u8", "*fp32"] + ["i32"] * 8,
       dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=4, FP32=False))
BLOCKS = dict(BLOCK_N=8, BLOCK_K=512, STAGES=2)


def build(fn, types, consts, arch):
    names = fn.arg_names
    sig = {n: t for n, t in zip(names, types)} | {n: "constexpr" for n in consts}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "enable_fp_fusion": True})
    assert kernel.asm["cubin"], (fn.__name__, arch, consts)
    print(fn.__name__, arch, consts.get("BITS"), consts.get("HAS_ZEROS"), consts.get("SP24", types[0]), "ok")


for arch in map(int, sys.argv[1:]):
    for bits in (2, 4, 8):
        for zeros in (False, True):
            fmt = dict(BITS=bits, GROUP=128, HAS_ZEROS=zeros)
            for fn, (types, blocks) in KERNELS.items():
                for sp24 in (False, True):  # dense, or 2:4 (kept codes + positions)
                    build(fn, types, fmt | dict(GROUP=128 if fn is not ti._dot_kernel else 64, SP24=sp24, **blocks),
                          arch)
            for even_k in (False, True):  # the GEMVs, tiles of whole groups (512 > 128), with and without a K tail
                build(ti._gemv_kernel, GEMV, fmt | dict(EVEN_K=even_k, **BLOCKS), arch)
                build(ti._sp24_int_gemv_kernel, SP24_GEMV + ["i32"], fmt | dict(EVEN_K=even_k, **BLOCKS), arch)
            for act in ("*bf16", "*fp16"):  # the activations pick the 16-bit type codes are dequantized in
                for sp24 in (False, True):
                    build(ti._mma_kernel, [act] + MMA[0], dict(BITS=bits, GROUP=128, HAS_ZEROS=zeros, SP24=sp24,
                                                               BF16_CODES=act == "*bf16" and bits < 8, **MMA[1]), arch)
    values = dict(BITS=16, GROUP=1 << 30, HAS_ZEROS=False)  # 2:4 float weights: the kept values
    build(ti._sp24_gemv_kernel, SP24_GEMV[:1] + ["*bf16"] + SP24_GEMV[2:], values | BLOCKS, arch)
    for fn, (types, blocks) in KERNELS.items():
        at = 0 if fn is ti._dequant_kernel else 1  # w_ptr: the values take the int32 words' place
        build(fn, types[:at] + ["*bf16"] + types[at + 1:], values | dict(SP24=True, **blocks), arch)
    for act in ("*bf16", "*fp16"):
        build(ti._mma_kernel, [act, act] + MMA[0][1:], values | dict(SP24=True, BF16_CODES=False, **MMA[1]), arch)
    for act in ("*bf16", "*fp16"):  # FP8 weights (triton_fp8.py): the GEMV and the dequantization,
        for hw in (False, True) if arch >= 89 else (False,):  # by the bits, or by the GPU's conversion
            build(tf._fp8_gemv_kernel, [act, "*u8", "*fp32", act] + ["i32"] * 5,
                  dict(BLOCK_N=16, BLOCK_K=256, HW_FP8=hw), arch)
            build(tf._fp8_dequant_kernel, ["*u8", "*fp16", act] + ["i32"] * 3,
                  dict(BLOCK_N=32, BLOCK_K=128, HW_FP8=hw), arch)
"""


def test_kernels_compile_for_sm80_and_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "80", "90"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # per target: 3 widths x 2 zero modes x (dense and 2:4 dot and dequantize + dense and 2:4 GEMV
    # with and without a K tail + 2 activation types x dense and 2:4 mma), then 3 + 2 for 2:4 float values,
    # then 2 activation types x 2 FP8 kernels by the bits, and on sm_90 by the conversion too
    assert proc.stdout.count(" ok") == 2 * (3 * 2 * (2 * 2 + 2 * 2 + 2 * 2) + 3 + 2 + 2 * 2) + 2 * 2
