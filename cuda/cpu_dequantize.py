"""Dequantization on CPU in C++ (csrc/cpu_int_matmul.cpp), for the calls the fused matmuls do not
serve: more rows of x than cpu_fused.MAX_M (prefill, evaluation), the gradient of x, and
`compress::dequantize_int`.

There, a compressed layer dequantizes its whole weight and hands it to PyTorch's dense matmul.
The reference (cuda/layout.py) does that in several passes of whole-weight tensors (unpack to
uint8 codes, widen to fp32, subtract, multiply; for 2:4, scatters and a mask besides): 2-3 ns per
weight, 30-45 ms for a 4096 x 4096 weight, as long as a dense fp32 matmul of ~150 rows of x. One pass
here writes each fp32 value once from the 32-bit words, with the reference's arithmetic, so the
weight is the reference's bit for bit and the matmul's result is unchanged. Each function returns
None where the kernels cannot be built (cpu_fused warned once); the caller runs the reference.
"""

from __future__ import annotations

import torch

from .cpu_fused import SCALE_KINDS, applies, check_values, checked_sp24, checked_weight, library


def _weight(n: int, k: int, dtype: torch.dtype, fill) -> torch.Tensor:
    """The weight [n, k] that `fill(pointer)` writes in fp32, in `dtype` (as the reference rounds it)."""
    w = torch.empty(n, k, dtype=torch.float32)
    if w.numel():
        fill(w.data_ptr())
    return w.to(dtype)


def dequantize(words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int,
               in_features: int, dtype: torch.dtype) -> torch.Tensor | None:
    """layout.dequantize_words(words, ...) exactly: the weight [N, K] in `dtype` (a format
    cpu_fused.applies takes, else a ValueError); None where the kernels could not be built."""
    lib = library()
    if lib is None:
        return None
    scales, zeros, span = checked_weight(words, scales, zeros, in_features, bits, group_size, in_features,
                                         applies(bits, group_size, in_features))
    return _weight(words.shape[0], in_features, dtype, lambda w: lib.int_dequantize(
        words.data_ptr(), words.shape[0], words.stride(0), scales.data_ptr(), SCALE_KINDS[scales.dtype],
        None if zeros is None else zeros.data_ptr(), bits, span, in_features, w, torch.get_num_threads()))


def sp24_dequantize(words: torch.Tensor, positions: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    bits: int, group_size: int, in_features: int, dtype: torch.dtype) -> torch.Tensor | None:
    """layout.dequantize_sp24_words(words, positions, ...) exactly (a format cpu_fused.sp24_applies
    takes, else a ValueError); None where the kernels could not be built."""
    lib = library()
    if lib is None:
        return None
    scales, zeros, span = checked_sp24(words, positions, scales, zeros, bits, group_size, in_features)
    return _weight(words.shape[0], in_features, dtype, lambda w: lib.sp24_int_dequantize(
        words.data_ptr(), words.shape[0], words.stride(0), positions.data_ptr(), positions.stride(0),
        scales.data_ptr(), SCALE_KINDS[scales.dtype], None if zeros is None else zeros.data_ptr(), bits, span,
        in_features, w, torch.get_num_threads()))


def sp24_float_dense(values: torch.Tensor, positions: torch.Tensor, in_features: int,
                     dtype: torch.dtype) -> torch.Tensor | None:
    """layout.dense_sp24_values(values, positions, ...) exactly (values [N, K / 2] fp32, fp16 or
    bf16 on the CPU, else a ValueError); None where the kernels could not be built."""
    lib = library()
    if lib is None:
        return None
    check_values(values, positions, in_features)
    return _weight(values.shape[0], in_features, dtype, lambda w: lib.sp24_float_dense(
        values.data_ptr(), SCALE_KINDS[values.dtype], values.stride(0), values.shape[0], positions.data_ptr(),
        positions.stride(0), in_features, w, torch.get_num_threads()))


# Weight floats dequantized per block of rows where a call has more rows of x than the fused
# matmuls serve: 8 MB of fp32, so that the block is still in cache when the matmul reads it and
# a call never holds the whole fp32 weight. On this project's 2-core CPU, one exploratory run
# (fp32, 4-bit g128, M = 32 / 512, 4096 x 4096): 16.6 / 98.7 ms in blocks of 512 rows against
# 34.9 / 133.7 for the whole weight at once and 10.7 / 111.2 for a dense fp32 matmul (blocks of
# 128 and 1024 rows were slower). smollm2-135m's weights (at most 1536 x 576) fit in one block.
BLOCK_FLOATS = 1 << 21


def blocked_linear(x: torch.Tensor, n: int, in_features: int, rows,
                   bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [M, K] @ W.T (+ bias [N], added by the matmul as F.linear adds it) -> [M, N] in x's dtype,
    with `rows(n0, n1)` the weight's rows [n1 - n0, K] in x's dtype (None where the kernels could
    not be built: then None)."""
    step = max(16, BLOCK_FLOATS // max(in_features, 1))
    if step >= n:
        w = rows(0, n)
        return None if w is None else torch.nn.functional.linear(x, w, bias)
    y = x.new_empty(x.shape[0], n)
    for n0 in range(0, n, step):
        w = rows(n0, min(n0 + step, n))
        if w is None:
            return None
        y[:, n0:n0 + step] = torch.nn.functional.linear(x, w, None if bias is None else bias[n0:n0 + step])
    return y


def int_linear(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
               group_size: int, in_features: int) -> torch.Tensor | None:
    """x [M, K] @ dequantize_words(words, ...).T -> [M, N] in x's dtype, dequantized in blocks."""
    return blocked_linear(x, words.shape[0], in_features, lambda n0, n1: dequantize(
        words[n0:n1], scales[:, n0:n1], None if zeros is None else zeros[:, n0:n1], bits, group_size, in_features,
        x.dtype))


def sp24_int_linear(x: torch.Tensor, words: torch.Tensor, positions: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor | None, bits: int, group_size: int, in_features: int) -> torch.Tensor | None:
    """x [M, K] @ dequantize_sp24_words(words, positions, ...).T -> [M, N], dequantized in blocks."""
    return blocked_linear(x, words.shape[0], in_features, lambda n0, n1: sp24_dequantize(
        words[n0:n1], positions[n0:n1], scales[:, n0:n1], None if zeros is None else zeros[:, n0:n1], bits,
        group_size, in_features, x.dtype))


def sp24_float_linear(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                      in_features: int) -> torch.Tensor | None:
    """x [M, K] @ dense_sp24_values(values, positions, ...).T -> [M, N], placed in blocks."""
    return blocked_linear(x, values.shape[0], in_features, lambda n0, n1: sp24_float_dense(
        values[n0:n1], positions[n0:n1], in_features, x.dtype))
