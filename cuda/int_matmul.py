"""Launchers for the integer-weight Triton kernels and the per-shape choice between them.

`int_matmul(x, w)` computes x [M, K] @ dequantize(w).T -> [M, N] in x's dtype. Candidates per
M: the GEMV kernel (M = 1), the two tensor-core kernels (weights as the MMA's B operand, or as
its A operand with cheaper dequantization) at several tile sizes and split-K
factors, and dequantize + cuBLAS (which wins at large M, where the matmul is compute-bound). The
first call of each (device, format, N, K, M bucket) times them all once and keeps the fastest
(`TUNER.choices()` lists what was chosen); PyTorch's own kernels (tinygemm for int4,
cuSPARSELt for 2:4 float weights) are candidates where the weight was prepared for them. Timing replays CUDA graphs, as a served model runs
(torch.compile with CUDA graphs): launch overhead from Python would otherwise swamp
microsecond kernels and pick by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from . import cusparselt, tinygemm
from .triton_int import (_dequant_kernel, _dot_kernel, _gemv_kernel, _mma_kernel, _sp24_gemv_kernel,
                         _sp24_int_gemv_kernel)
from .tuning import Candidate, Tuner, Unavailable, interpreting

ONE_GROUP = 1 << 30  # GROUP constant for per-channel scales (one group spans every K)
# Multiply-adds fused into FMAs, asked for at every launch: Triton 3.9 fuses by default but warns
# that 3.10 will not, and unfused they are separate instructions in loops bound by instruction
# issue (the GEMV's K loop: 8.6-8.8 instructions per weight against 7.6-7.9, kernel_sass.py).
FP_FUSION = True


@dataclass(frozen=True)
class IntWeight:
    """Kernel inputs of one layer (layout.py): words int32 [N, n_words]; scales [n_groups, N];
    zeros uint8 [n_groups, N] or None (symmetric); codes of `bits` in groups of `group_size`
    columns along in_features = K. `tinygemm`: the same weight in PyTorch's int4 layout
    (tinygemm.pack), when it was prepared. `positions` (int32 [N, n_pos_words]): the weight is
    2:4 sparse, `words` holding only the K / 2 kept codes of each row and `positions` their slots
    in their groups of 4 (layout.dequantize_sp24_words). `bits` 16: a 2:4 float weight, `words`
    the kept values themselves (16-bit [N, K / 2], no scales: `sp24_values`); `cusparselt`: the
    same weight in cuSPARSELt's layout (cusparselt.pack), when it was prepared."""

    words: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int
    tinygemm: tuple[torch.Tensor, torch.Tensor] | None = None
    positions: torch.Tensor | None = None
    cusparselt: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.words.shape[0]

    @property
    def group(self) -> int:
        """The GROUP constant the kernels are compiled for."""
        return ONE_GROUP if self.group_size >= self.in_features else self.group_size


def sp24_values(values: torch.Tensor, positions: torch.Tensor, packed: torch.Tensor | None = None) -> IntWeight:
    """A 2:4 float weight: kept values [N, K / 2] (16-bit), positions int32 [N, K / 32]."""
    k = values.shape[1] * 2
    return IntWeight(values, values, None, 16, k, k, positions=positions, cusparselt=packed)  # scales: never read


def block_k_fits(block_k: int, group: int, bits: int, sp24: bool = False) -> bool:
    """A K tile lies inside one group or covers whole groups, and holds at least one word per row
    (2:4: of the kept codes, half the tile, and of the positions, 16 per word; and each of the
    tensor-core kernels' four MMAs, one per slot, spans at least 16 columns)."""
    if sp24:  # (the 2:4 integer GEMV scales each position word's 32 columns as one: groups of >= 32)
        return block_k % 64 == 0 and group % 32 == 0 and block_k_fits(block_k // 2, group // 2, bits)
    return (group % block_k == 0 or block_k % group == 0) and block_k >= 32 // bits


def _args(w: IntWeight) -> tuple:
    """(words, positions, scales, zeros, n_pos_words, SP24) as the kernels take them; what a
    format lacks is passed as another tensor the kernel never reads."""
    zeros = w.zeros if w.zeros is not None else w.scales  # never read when HAS_ZEROS is False
    sp24 = w.positions is not None
    positions = w.positions if sp24 else w.words  # never read when SP24 is False
    return w.words, positions, w.scales, zeros, positions.shape[1], sp24


GEMV_MAGIC = 0x43800000  # bits of the fp32 256.0 (`_gemv_kernel` derives each code's bias from it)


def gemv(x: torch.Tensor, w: IntWeight, block_n: int, block_k: int, num_warps: int = 4,
         stages: int = 1) -> torch.Tensor:
    """x [1, K] -> [1, N]."""
    n, k = w.out_features, w.in_features
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    words, positions, scales, zeros, n_pos_words, sp24 = _args(w)
    grid = (triton.cdiv(n, block_n),)
    fmt = dict(BITS=w.bits, GROUP=w.group, HAS_ZEROS=w.zeros is not None, BLOCK_N=block_n, BLOCK_K=block_k,
               STAGES=stages, num_warps=num_warps, enable_fp_fusion=FP_FUSION)
    if sp24 and w.bits == 16:
        _sp24_gemv_kernel[grid](x, words, positions, scales, zeros, y, n, k, words.shape[1], n_pos_words, **fmt)
    elif sp24:
        _sp24_int_gemv_kernel[grid](x, words, positions, scales, zeros, y, n, k, words.shape[1], n_pos_words,
                                    GEMV_MAGIC, EVEN_K=k % block_k == 0, **fmt)
    else:
        _gemv_kernel[grid](x, words, scales, zeros, y, n, k, words.shape[1], GEMV_MAGIC, EVEN_K=k % block_k == 0,
                           **fmt)
    return y


def dot(x: torch.Tensor, w: IntWeight, block_m: int, block_n: int, block_k: int, split_k: int = 1,
        num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """x [M, K] -> [M, N] through tensor cores; split_k > 1 adds fp32 partial sums atomically."""
    m, n, k = x.shape[0], w.out_features, w.in_features
    y = (torch.zeros(m, n, dtype=torch.float32, device=x.device) if split_k > 1
         else torch.empty(m, n, dtype=x.dtype, device=x.device))
    words, positions, scales, zeros, n_pos_words, sp24 = _args(w)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    _dot_kernel[grid](
        x, words, positions, scales, zeros, y, m, n, k, words.shape[1], n_pos_words, x.stride(0), y.stride(0),
        BITS=w.bits, GROUP=w.group, HAS_ZEROS=w.zeros is not None, SP24=sp24, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, SPLIT_K=split_k, FP32=interpreting() or x.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=FP_FUSION)
    return y.to(x.dtype) if split_k > 1 else y


# Bits of the 16-bit float the codes are OR-ed into (`_mma_kernel`): 128.0 in bf16, 1024.0 in fp16,
# whose last mantissa bit is worth 1, so magic | code reads as the float magic + code.
CODE_MAGIC = {torch.bfloat16: 0x4300, torch.float16: 0x6400}


def mma_fits(block_k: int, group: int, bits: int, sp24: bool = False) -> bool:
    """`_mma_kernel` scales each K tile as a whole: the tile lies inside one group (and holds a
    word per row). 2:4: each of the tile's four MMAs, one per slot, spans at least 16 columns."""
    if sp24:
        return block_k % 64 == 0 and mma_fits(block_k // 2, group // 2, bits)
    return group % block_k == 0 and block_k >= 32 // bits


def mma(x: torch.Tensor, w: IntWeight, block_m: int, block_n: int, block_k: int, split_k: int = 1,
        num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """x [M, K] -> [M, N] through tensor cores with the weight as the A operand."""
    m, n, k = x.shape[0], w.out_features, w.in_features
    y = (torch.zeros(m, n, dtype=torch.float32, device=x.device) if split_k > 1
         else torch.empty(m, n, dtype=x.dtype, device=x.device))
    words, positions, scales, zeros, n_pos_words, sp24 = _args(w)
    fp32 = interpreting() or x.dtype == torch.float32
    # bf16 holds 128 + code exactly for codes below 128; otherwise fp16 (1024 + code), converted
    bf16_codes = x.dtype == torch.bfloat16 and w.bits < 8 and not fp32
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    _mma_kernel[grid](
        x, words, positions, scales, zeros, y, m, n, k, words.shape[1], n_pos_words, x.stride(0), y.stride(0),
        CODE_MAGIC[torch.bfloat16 if bf16_codes else torch.float16] * 0x10001, BITS=w.bits, GROUP=w.group,
        HAS_ZEROS=w.zeros is not None, SP24=sp24, BF16_CODES=bf16_codes, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, SPLIT_K=split_k, FP32=fp32, num_warps=num_warps, num_stages=num_stages,
        enable_fp_fusion=FP_FUSION)
    return y.to(x.dtype) if split_k > 1 else y


def dequantize(w: IntWeight, dtype: torch.dtype, block_n: int = 32, block_k: int | None = None) -> torch.Tensor:
    """The dense weight [N, K] in `dtype`."""
    n, k = w.out_features, w.in_features
    words, positions, scales, zeros, n_pos_words, sp24 = _args(w)
    if block_k is None:
        block_k = next(b for b in (128, 64, 32, 16) if block_k_fits(b, w.group, w.bits, sp24))
    out = torch.empty(n, k, dtype=dtype, device=w.words.device)
    _dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        words, positions, scales, zeros, out, n, k, words.shape[1], n_pos_words,
        BITS=w.bits, GROUP=w.group, HAS_ZEROS=w.zeros is not None, SP24=sp24, BLOCK_N=block_n, BLOCK_K=block_k,
        enable_fp_fusion=FP_FUSION)
    return out


# Candidate tile configurations, first = the interpreter's choice; the rest are those that won or
# came within 10% on an H200 (benchmarks/results/h200-2026-11-26 and -27), since each costs a
# compile the first time a shape is seen. (block_n, block_k, warps, stages) for GEMV (the 2:4 GEMV
# keeps those the former dense GEMV won with); (block_m, block_n, block_k, split_k, warps, stages)
# for the tensor-core kernel by M range. From M = 64 on, dequantize + cuBLAS beats our tensor-core
# kernel 2-10x there: one configuration stays measured.
# The dense GEMV's have not been timed yet: each thread should hold several rows of its columns
# (their sums of x serve them all), and at 8 bits no more than 128 weights (32 words; else
# registers spill). These spend 3.3-3.8 instructions per weight at 4 bits, 3.3-4.4 at 2 and
# 4.5-4.8 at 8 (kernel_sass.py). Narrow one-warp programs (8 rows) keep bytes in flight on every
# SM: N = 4096 makes 512 of them; a third stage deepens each one's pipeline.
GEMV_CONFIGS = [(16, 128, 4, 1), (8, 1024, 1, 2), (8, 1024, 1, 3), (16, 512, 1, 2), (16, 1024, 2, 2),
                (32, 512, 2, 2), (32, 1024, 4, 2), (16, 256, 1, 2)]
GEMV_8BIT_CONFIGS = [(16, 128, 4, 1), (8, 512, 1, 2), (8, 512, 1, 3), (16, 256, 1, 2), (16, 512, 2, 2),
                     (32, 256, 2, 2), (32, 512, 4, 2)]
SP24_GEMV_CONFIGS = [(16, 128, 4, 1), (4, 512, 2, 2), (8, 1024, 8, 2), (4, 1024, 4, 2), (8, 512, 4, 2),
                     (16, 256, 4, 2)]
# 2:4 codes (`_sp24_int_gemv_kernel`, not timed yet): 5.3 instructions per dense weight at 4
# bits with tiles of 512 columns, 6.0 with 128 (kernel_sass.py --sp24 --kernels gemv)
SP24_INT_GEMV_CONFIGS = [(16, 128, 4, 1), (8, 512, 1, 2), (16, 512, 2, 2), (32, 512, 4, 2), (32, 128, 1, 2)]
DOT_CONFIGS = {  # block_k 128 suits 4-bit (16 words), 64 suits 8-bit
    16: [(16, 64, 128, 4, 4, 3), (16, 64, 64, 8, 4, 3), (16, 128, 128, 4, 8, 3), (16, 32, 128, 4, 4, 3),
         (16, 32, 128, 8, 4, 3)],
    64: [(32, 64, 128, 2, 4, 3), (32, 128, 128, 2, 4, 3)],
    256: [(64, 128, 128, 1, 4, 3)],
    None: [(128, 256, 128, 1, 8, 3)],
}

# (block_m, block_n, block_k, split_k, warps, stages) for `_mma_kernel` by M range: not yet timed
# on a GPU; chosen from the compiled code's instruction counts (benchmarks/kernel_sass.py) and from
# enough programs (N / block_n * split_k) to fill 132 SMs on the benchmark shapes.
MMA_CONFIGS = {
    16: [(16, 64, 128, 4, 4, 3), (16, 128, 128, 4, 4, 3), (16, 64, 128, 8, 4, 3), (16, 128, 64, 4, 4, 4)],
    64: [(64, 64, 128, 2, 4, 3), (64, 128, 128, 2, 4, 3), (32, 128, 128, 2, 4, 3)],
    256: [(64, 128, 128, 1, 4, 3), (128, 128, 128, 1, 8, 3)],
    None: [(128, 128, 128, 1, 8, 3)],
}


# The choice is measured per power of two of M (at the first M seen in each, then kept): M = 4 and
# M = 16 may want different split-K, M = 512 and 4096 different kernels. Above 4096, one choice.
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def _m_bucket(m: int) -> int | None:
    return next((b for b in M_BUCKETS if m <= b), None)


def _config_range(bucket: int | None) -> int | None:
    """The M range (a key of DOT_CONFIGS and MMA_CONFIGS) a bucket's candidate tiles come from."""
    return None if bucket is None else next((r for r in (16, 64, 256) if bucket <= r), None)


def gemv_configs(sp24: bool, bits: int) -> list[tuple[int, int, int, int]]:
    if sp24:
        return SP24_GEMV_CONFIGS if bits == 16 else SP24_INT_GEMV_CONFIGS
    return GEMV_8BIT_CONFIGS if bits == 8 else GEMV_CONFIGS


def _gemv(bn: int, bk: int, nw: int, ns: int) -> Candidate:
    return Candidate(f"gemv n{bn} k{bk} w{nw} s{ns}", lambda x, w: gemv(x, w, bn, bk, nw, ns))


def _mma(bm: int, bn: int, bk: int, sk: int, nw: int, ns: int) -> Candidate:
    return Candidate(f"mma m{bm} n{bn} k{bk} split{sk} w{nw} s{ns}", lambda x, w: mma(x, w, bm, bn, bk, sk, nw, ns))


def _dot(bm: int, bn: int, bk: int, sk: int, nw: int, ns: int) -> Candidate:
    return Candidate(f"dot m{bm} n{bn} k{bk} split{sk} w{nw} s{ns}", lambda x, w: dot(x, w, bm, bn, bk, sk, nw, ns))


DEQUANT_MATMUL = Candidate("dequant+matmul", lambda x, w: torch.nn.functional.linear(x, dequantize(w, x.dtype)))


def _library(fn):
    """A library call as a candidate: its refusal of a shape rules it out instead of failing the call."""
    def run(*args) -> torch.Tensor:  # (x, weight...) as the candidates take them
        try:
            return fn(*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise Unavailable(str(e)) from e
    return run


TINYGEMM = Candidate("tinygemm (PyTorch)", _library(lambda x, w: tinygemm.matmul(x, *w.tinygemm, w.group_size)))

CUSPARSELT = Candidate("cuSPARSELt (PyTorch)", _library(lambda x, w: cusparselt.matmul(x, w.cusparselt)))


def candidates(m: int, dtype: torch.dtype, group: int, bits: int, has_tinygemm: bool,
               sp24: bool = False, has_cusparselt: bool = False) -> list[Candidate]:
    out: list[Candidate] = [TINYGEMM] if has_tinygemm and dtype == torch.bfloat16 else []
    out += [CUSPARSELT] if has_cusparselt else []
    if dtype != torch.float32:  # fp32 activations: no tensor-core path, dense fp32 matmul instead
        tiles = _config_range(_m_bucket(m))
        if m == 1:
            out += [_gemv(*c) for c in gemv_configs(sp24, bits) if block_k_fits(c[1], group, bits, sp24)]
        out += [_dot(*c) for c in DOT_CONFIGS[tiles] if block_k_fits(c[2], group, bits, sp24)]
        out += [_mma(*c) for c in MMA_CONFIGS[tiles] if mma_fits(c[2], group, bits, sp24)]
    return out + [DEQUANT_MATMUL]


def _measure(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=10)


def _agrees(y: torch.Tensor, ref: torch.Tensor) -> bool:
    """A candidate's output against dequantize + cuBLAS: kernels differ from it by rounding the
    weight or the sums differently (~1e-3 relative in bf16); a wrong kernel is off by ~1."""
    tol = 1e-3 if y.dtype == torch.float32 else 2e-2
    return y.shape == ref.shape and bool(((y.float() - ref.float()).norm() <= tol * ref.float().norm()).item())


TUNER = Tuner(_measure, skip=(OutOfResources, CompilationError, Unavailable), agree=_agrees)


def tuner_key(x: torch.Tensor, w: IntWeight) -> tuple:
    """The problem `int_matmul(x, w)` is tuned for (`TUNER.choices()` is keyed by it)."""
    return (x.device, x.dtype, w.bits, w.group, w.zeros is not None, w.out_features, w.in_features,
            _m_bucket(x.shape[0]), w.tinygemm is not None, w.positions is not None, w.cusparselt is not None)


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph capture is running on `device`'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def int_matmul(x: torch.Tensor, w: IntWeight) -> torch.Tensor:
    """x [M, K] (contiguous) -> [M, N], the fastest measured candidate for this shape (PyTorch's
    tinygemm or cuSPARSELt among them when `w` was prepared for them)."""
    m, key = x.shape[0], tuner_key(x, w)
    if key not in TUNER.chosen and _capturing(x.device):  # timing cannot run in a capture
        raise RuntimeError(f"compress: no kernel was chosen yet for a {w.out_features} x {w.in_features} "
                           f"{w.bits}-bit weight at M = {m} when CUDA graph capture began; run the model once "
                           "outside the capture first (torch.compile's CUDA graphs do: they warm up before)")
    tg, sp24, cslt = w.tinygemm is not None, w.positions is not None, w.cusparselt is not None
    return TUNER.run(key, lambda: candidates(m, x.dtype, w.group, w.bits, tg, sp24, cslt), x, w)
