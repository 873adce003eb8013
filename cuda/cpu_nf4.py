"""bitsandbytes' NF4 / FP4 weights (quant/nf4.py: NF4Linear) on CPU in C++ (csrc/cpu_int_matmul.cpp,
built by cpu_native.py): a matmul with the decoding fused in, for few rows of x, and the
dequantization, for more.

bitsandbytes' CPU path rebuilds the whole fp32 weight with PyTorch indexing on every call (and
its double-quantized absmax first): an NF4 smollm2-135m decoded 2.7 tokens/s on this project's
2-core CPU, against the float model's ~20. The kernels read the codes where they lie, two a byte
(the first in the high nibble), with each block's absmax in fp32, derived once (`absmax_fp32`):

    w[n, k] = level[code] * absmax[(n * K + k) / block]

With AVX-512 a block's 16 levels times its absmax are one vector, so the weights are
bitsandbytes' fp32 weight bit for bit (the dequantization returns exactly that) and the matmul
differs from its result by the order of the sums only. With 16-bit activations or weight dtypes
bitsandbytes rounds the weight to them first, so NF4Linear gives those calls the dequantized
weight, rounded the same way, at every M. A prepacked layer holds each block's absmax in fp32
beside the stored 8-bit codes: 0.5 bit per weight at blocks of 64.
"""

from __future__ import annotations

import torch

from .cpu_dequantize import blocked_linear
from .cpu_fused import Fused, library

# Largest M the fused matmul serves under "auto"; beyond it the weight is dequantized a block of
# rows at a time and multiplied by PyTorch's matmul (FusedNf4.linear). On this project's 2-core CPU
# (AVX-512 build, NF4 block 64 double-quantized, 2026-12-06; fused / dequantized + matmul / the
# fp32 matmul of the float weight, us): M = 16 about even on smollm2-135m's shapes (1536 x 576:
# 420 / 433 / 327, 576 x 576: 158 / 146 / 113) and the fused matmul ahead at 4096^2 (7289 / 17043
# / 5889); M = 32 the dequantization ahead on the small shapes (577 against 825 at 1536 x 576).
# M = 1: 75 / 35 / 1244 us fused against the fp32 matmul's 64 / 20 / 1821.
MAX_M = 16


def applies(in_features: int, block_size: int) -> bool:
    """Whether the kernels read this layout: blocks of whole 16-code vectors inside rows."""
    return block_size > 0 and block_size % 16 == 0 and in_features % block_size == 0


def absmax_fp32(state) -> torch.Tensor:
    """Each block's absmax [blocks] in fp32 from a bitsandbytes QuantState, as its dequantize_4bit
    computes it (double quantization undone the same way, so the products are its own)."""
    import bitsandbytes.functional as F

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
    return absmax.float().contiguous()


class FusedNf4(Fused):
    """An NF4 / FP4 weight [N, K] as bitsandbytes stores it, checked once (else a ValueError): codes
    uint8 [N * K / 2, 1], levels fp32 [16], absmax fp32 [N * K / block]."""

    max_m = MAX_M

    def __init__(self, codes: torch.Tensor, levels: torch.Tensor, absmax: torch.Tensor, block_size: int,
                 out_features: int, in_features: int) -> None:
        n, k = out_features, in_features
        if (not applies(k, block_size) or codes.dtype != torch.uint8 or codes.numel() * 2 != n * k
                or not codes.is_contiguous() or levels.dtype != torch.float32 or levels.numel() != 16
                or absmax.dtype != torch.float32 or absmax.numel() != n * k // block_size
                or not all(t.is_cpu for t in (codes, levels, absmax))):
            raise ValueError(f"the C++ CPU kernels take a {n} x {k} 4-bit weight in blocks of {block_size} (a "
                             f"multiple of 16 dividing K) as {n * k // 2} uint8 bytes, 16 fp32 levels and "
                             f"{n * k // max(block_size, 1)} fp32 absmax on the CPU, not {codes.numel()} "
                             f"{codes.dtype} bytes, {levels.numel()} {levels.dtype} levels and {absmax.numel()} "
                             f"{absmax.dtype} absmax")
        self._tensors = (codes.reshape(n, k // 2), levels.contiguous(), absmax.reshape(n, k // block_size))
        self.block_size, self.out_features, self.in_features = block_size, n, k

    def _run(self, lib, x: torch.Tensor, y: torch.Tensor) -> None:
        codes, levels, absmax = self._tensors
        lib.nf4_matmul(x.data_ptr(), x.numel() // self.in_features, self.in_features, codes.data_ptr(),
                       self.out_features, absmax.data_ptr(), levels.data_ptr(), self.block_size, y.data_ptr(),
                       torch.get_num_threads())

    def rows(self, n0: int, n1: int) -> torch.Tensor | None:
        """Rows [n0, n1) of the fp32 weight, bitsandbytes' bit for bit; None where the kernels could
        not be built."""
        lib = library()
        if lib is None:
            return None
        codes, levels, absmax = (t[n0:n1] if t.dim() == 2 else t for t in self._tensors)
        w = torch.empty(n1 - n0, self.in_features, dtype=torch.float32)
        if w.numel():
            lib.nf4_dequantize(codes.data_ptr(), n1 - n0, self.in_features, absmax.data_ptr(), levels.data_ptr(),
                               self.block_size, w.data_ptr(), torch.get_num_threads())
        return w

    def linear(self, x: torch.Tensor, weight_dtype: torch.dtype,
               bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """x [M, K] @ W.T (+ bias, as F.linear adds it) -> [M, N] in x's dtype, the weight dequantized
        a block of rows at a time and rounded as bitsandbytes rounds it (to `weight_dtype`, then x's
        dtype); None where the kernels could not be built."""
        def rows(n0: int, n1: int) -> torch.Tensor | None:
            w = self.rows(n0, n1)
            return None if w is None else w.to(weight_dtype).to(x.dtype)

        return blocked_linear(x, self.out_features, self.in_features, rows, bias)
