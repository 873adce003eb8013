"""Triton kernels for FP8 (e4m3) weights with one scale per output row (quant/layers.py:
FP8Linear), and the per-shape choice among them (cuda/tuning.py):

- `_fp8_gemv_kernel` (M = 1 to 16, decode): each program owns BLOCK_N rows of the weight and
  one row of x and walks all of K, one byte a weight read. On CUDA PyTorch's reference converts
  the whole weight to fp32, scales it and casts it on every call (three kernels writing 6 bytes
  a weight where a bf16 matmul reads 2).
- `_fp8_dequant_kernel`: the dense weight in the activations' dtype in one pass, for more rows of
  x (then cuBLAS multiplies) and for `compress::dequantize_fp8` (x's gradient, merges).

Each code is decoded by the GPU's conversion where it has one (sm_89 and later: two codes an
instruction, `HW_FP8`), else as the CPU kernels do (csrc/cpu_int_matmul.cpp): its byte
sign-extended to 16 bits, shifted left by 7 and bit 14 cleared is the fp16 of its value times
2**-8, subnormals included, and the 2**8 joins the row's scale. Both are exact; NaN codes (0x7f,
0xff) decode to NaN. In the GEMV's loop (sm_90, 16 x 256 tiles, static counts of
benchmarks/kernel_sass.py-style compiles) that is 3.8 instructions per weight and thread with the
conversion, 10.3 by the bits. The dense weight is the reference's bit for bit; the GEMV sums in
fp32.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from .int_matmul import _capturing, _library, _measure
from .tuning import Candidate, Tuner, Unavailable, interpreting

@triton.jit
def _e4m3(codes, HW_FP8: tl.constexpr):
    """uint8 codes -> their e4m3 values in fp32 (NaN for 0x7f / 0xff), times 2**-8 unless HW_FP8."""
    if HW_FP8:
        return codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    h = (codes.to(tl.int8, bitcast=True).to(tl.int16) << 7) & -16385  # bit 14 (a sign copy) cleared
    v = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return tl.where((codes & 0x7F) == 0x7F, float("nan"), v)


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_ym,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HW_FP8: tl.constexpr):
    # x [M, K], w uint8 [N, K] (rows stride_wn apart), s [N], y [M, N]; grid (N / BLOCK_N, M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1)
    n_ok = rn < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # reduced once, after the loop
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        codes = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0)
        x = tl.load(x_ptr + m * stride_xm + rk, mask=k_ok, other=0.0).to(tl.float32)
        acc += _e4m3(codes, HW_FP8) * x[None, :]
    scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32) * (1.0 if HW_FP8 else 256.0)
    y = tl.sum(acc, axis=1) * scale
    tl.store(y_ptr + m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _fp8_dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        HW_FP8: tl.constexpr):
    # out [N, K] = e4m3(w) * s[:, None] in out's dtype; grid (N / BLOCK_N, K / BLOCK_K)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (rn < N)[:, None] & (rk < K)[None, :]
    codes = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :], mask=ok, other=0)
    scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32) * (1.0 if HW_FP8 else 256.0)
    w = _e4m3(codes, HW_FP8) * scale[:, None]
    tl.store(out_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)


def hw_fp8(device: torch.device) -> bool:
    """Whether the kernels decode with the GPU's e4m3 conversion (NVIDIA sm_89 and later; not in the
    interpreter, not on ROCm)."""
    return device.type == "cuda" and not interpreting() and _converts_e4m3(device.index)


@functools.cache
def _converts_e4m3(index: int | None) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(index) >= (8, 9)


def _codes(weight: torch.Tensor) -> torch.Tensor:
    """weight float8_e4m3fn [N, K] as the kernels read it: uint8, rows contiguous (a view)."""
    return (weight if weight.stride(1) == 1 else weight.contiguous()).view(torch.uint8)


def gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, block_n: int = 16, block_k: int = 256,
         num_warps: int = 4) -> torch.Tensor:
    """x [M, K] (contiguous) @ (weight * scales).T -> [M, N] in x's dtype."""
    codes, (m, k), n = _codes(weight), x.shape, weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _fp8_gemv_kernel[(triton.cdiv(n, block_n), m)](x, codes, scales.reshape(-1).contiguous(), y, n, k, x.stride(0),
                                                   codes.stride(0), y.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
                                                   HW_FP8=hw_fp8(x.device), num_warps=num_warps)
    return y


def dequantize(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, block_n: int = 32,
               block_k: int = 128) -> torch.Tensor:
    """The dense weight [N, K] in `dtype`, (weight.float() * scales).to(dtype) exactly."""
    codes, (n, k) = _codes(weight), weight.shape
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    _fp8_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        codes, scales.reshape(-1).contiguous(), out, n, k, codes.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
        HW_FP8=hw_fp8(weight.device))
    return out


# GEMV tiles (block_n, block_k, warps), first = the interpreter's choice. Not timed on a GPU yet:
# narrow programs keep many rows' bytes in flight (N = 4096 makes 256 to 512 of them), and each
# thread's 16 to 32 codes a row load as one or two 16-byte vectors.
GEMV_CONFIGS = [(16, 256, 4), (8, 512, 4), (16, 512, 4), (32, 256, 4), (8, 1024, 8)]
GEMV_MAX_M = 16  # beyond: dequantize + cuBLAS (the GEMV reads the weight once per row of x)
DEQUANT_MATMUL = Candidate("dequant+matmul", _library(
    lambda x, weight, scales: torch.nn.functional.linear(x, dequantize(weight, scales, x.dtype))))


def candidates(m: int) -> list[Candidate]:
    gemvs = [Candidate(f"fp8 gemv n{bn} k{bk} w{nw}", lambda x, weight, scales, c=(bn, bk, nw): gemv(
        x, weight, scales, *c)) for bn, bk, nw in GEMV_CONFIGS] if m <= GEMV_MAX_M else []
    return gemvs + [DEQUANT_MATMUL]


def _agrees(y: torch.Tensor, ref: torch.Tensor) -> bool:
    """A GEMV's output against dequantize + cuBLAS (different roundings: the GEMV's weight is exact,
    the reference's rounded to the activations' dtype); NaN rows, which both give, compared as such."""
    nan = ref.isnan()
    if y.shape != ref.shape or not torch.equal(y.isnan(), nan):
        return False
    tol = 1e-3 if y.dtype == torch.float32 else 2e-2  # the GEMV keeps the weight exact: ~3e-3 off in bf16
    y, ref = y.float().masked_fill(nan, 0), ref.float().masked_fill(nan, 0)
    return bool(((y - ref).norm() <= tol * ref.norm()).item())


TUNER = Tuner(_measure, skip=(OutOfResources, CompilationError, Unavailable), agree=_agrees)


def _m_bucket(m: int) -> int:
    return next((b for b in (1, 4, GEMV_MAX_M) if m <= b), 0)  # 0: more rows than the GEMV serves


def tuner_key(x: torch.Tensor, weight: torch.Tensor) -> tuple:
    """The problem `fp8_matmul(x, weight, ...)` is tuned for (`TUNER.choices()` is keyed by it)."""
    return (x.device, x.dtype, *weight.shape, _m_bucket(x.shape[0]))


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] (contiguous) -> [M, N], the fastest measured candidate for this shape."""
    n, k = weight.shape
    key = tuner_key(x, weight)
    if key not in TUNER.chosen and _capturing(x.device):  # timing cannot run in a capture
        raise RuntimeError(f"compress: no kernel was chosen yet for a {n} x {k} fp8 weight at M = {x.shape[0]} "
                           "when CUDA graph capture began; run the model once outside the capture first")
    return TUNER.run(key, lambda: candidates(x.shape[0]), x, weight, scales)
