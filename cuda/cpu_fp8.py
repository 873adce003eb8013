"""FP8 (e4m3) weights with one scale per output row (quant/layers.py: FP8Linear) on CPU in C++
(csrc/cpu_int_matmul.cpp, built by cpu_native.py): a matmul with the decoding fused in, for few
rows of x, and the dequantization, for more.

The reference (FP8Linear.dequantized_weight, then a matmul) converts the weight with PyTorch,
which turns e4m3 into fp32 a value at a time: 2.5 ms for one of smollm2-135m's 1536 x 576 weights
on this project's 2-core CPU, 27x the fp32 matmul at one row of x, and an fp8 smollm2-135m decoded
2.6 tokens/s against the float model's 21.9. The kernels decode 16 codes with four vector
instructions (a code's bits moved into an fp16 and converted, cpu_int_matmul.cpp) and read one
byte a weight where the float model reads four:

    y[m, n] = scale[n] * sum_k e4m3(w[n, k]) * x[m, k]            in fp32

the reference's values up to the order of the sums with fp32 activations (with 16-bit ones the
reference also rounds the weight to their dtype, so the ops give those the dequantized weight,
which is the reference's bit for bit). Scales above 2**120 would overflow the 2**8 they are
multiplied by (FP8Linear's are absmax / 448). NaN codes (0x7f, 0xff; FP8Linear never writes
them) make their rows NaN, as in the reference.
"""

from __future__ import annotations

import torch

from .cpu_dequantize import blocked_linear
from .cpu_fused import SCALE_KINDS, Fused, library

# Largest M the fused matmul serves under "auto"; beyond it the weight is dequantized a block of
# rows at a time and multiplied by PyTorch's matmul. On this project's 2-core CPU (AVX-512 build,
# fp32, 2026-12-06; fused / dequantized + matmul / the fp32 matmul of the float weight, us): at
# M = 16 the fused matmul leads on smollm2-135m's shapes (576 x 576: 132 / 156 / 111, 1536 x 576:
# 402 / 526 / 355) and at 4096 x 4096 (5182 / 25593 / 5289); at M = 32 the dequantization leads on
# the small shapes (218 against 257 us at 576 x 576) and trails at 4096^2 (28.3 against 11.3 ms).
# At M = 1 the fused matmul took 29 / 63 / 1207 us on those shapes, the fp32 matmul 21 / 61 / 1691.
MAX_M = 16


def check(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The scales [N] as the kernels read them (fp32, fp16 or bf16, contiguous) once the weight
    (float8_e4m3fn [N, K] on the CPU, rows contiguous) and the scales' size are checked: the
    kernels trust them, and a mismatch would read past the tensors."""
    if (weight.dtype != torch.float8_e4m3fn or weight.dim() != 2 or weight.stride(1) != 1 or not weight.is_cpu
            or scales.numel() != weight.shape[0] or not scales.is_cpu):
        raise ValueError(f"the C++ CPU kernels take an fp8 weight [N, K] (float8_e4m3fn, rows contiguous, on the "
                         f"CPU) and N scales, not a weight {tuple(weight.shape)} ({weight.dtype}, {weight.device}) "
                         f"and {scales.numel()} scales")
    scales = scales.reshape(-1)
    return scales.contiguous() if scales.dtype in SCALE_KINDS else scales.float().contiguous()


class FusedFp8(Fused):
    """An fp8 weight float8_e4m3fn [N, K] and its scales [N] (or [N, 1]), checked once (else a
    ValueError) for the fused matmul."""

    max_m = MAX_M

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        self._tensors = (weight.view(torch.uint8), check(weight, scales))
        self.out_features, self.in_features = weight.shape

    def _run(self, lib, x: torch.Tensor, y: torch.Tensor) -> None:
        codes, scales = self._tensors
        lib.fp8_matmul(x.data_ptr(), x.numel() // self.in_features, self.in_features, codes.data_ptr(),
                       codes.shape[0], codes.stride(0), scales.data_ptr(), SCALE_KINDS[scales.dtype], y.data_ptr(),
                       torch.get_num_threads())


def matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """x [..., K] @ (weight * scales).T -> [..., N] in x's dtype; None when the kernels could not
    be built (cpu_fused warned once; the caller runs the reference)."""
    if library() is None:
        return None
    return FusedFp8(weight, scales)(x)


def dequantize(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The weight [N, K] in `dtype`, (weight.float() * scales).to(dtype) exactly; None where the
    kernels could not be built."""
    lib = library()
    if lib is None:
        return None
    scales = check(weight, scales)
    codes = weight.view(torch.uint8)
    w = torch.empty(weight.shape, dtype=torch.float32)
    if w.numel():
        lib.fp8_dequantize(codes.data_ptr(), codes.shape[0], codes.stride(0), scales.data_ptr(),
                           SCALE_KINDS[scales.dtype], codes.shape[1], w.data_ptr(), torch.get_num_threads())
    return w.to(dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """x [M, K] @ (weight * scales).T -> [M, N] in x's dtype, the weight dequantized in blocks of
    rows (cpu_dequantize.blocked_linear); None where the kernels could not be built."""
    scales = scales.reshape(-1)
    return blocked_linear(x, weight.shape[0], weight.shape[1],
                          lambda n0, n1: dequantize(weight[n0:n1], scales[n0:n1], x.dtype))

