"""PyTorch's packed integer CPU matmuls, for bf16 activations (where they are fast).

Measured on this project's 2-core CPU machine (4096x4096 weight): with bf16 activations,
`_weight_int4pack_mm_for_cpu` takes 1.3 ms at M=1 and 8.4 ms at M=16 against 1.8 and 25 ms for
a dense bf16 matmul, and `_weight_int8pack_mm` 0.8 and 6.5 ms. With fp32 or fp16 activations
both are 5 to 25 times slower than a dense fp32 matmul, so they are used for bf16 only.

int4: the semantics and scale layout of tinygemm.py. int8: symmetric per-channel only, w = (q - 128) * scale with q - 128 stored as int8.
"""

from __future__ import annotations

import torch

from .tinygemm import GROUPS, scales_and_zeros

# Largest M they serve under "auto" where the layer holds its words too: their time grows about
# linearly with M, and beyond it the C++ dequantization plus a dense bf16 matmul
# (cpu_dequantize.py) is faster. On this project's 2-core CPU, bf16, packed against dequantized
# (benchmarks/results/cpu-2026-12-04/, cpu_kernels_dequant.jsonl for int4, _thresholds for
# int8): int4 g64 at M = 64 0.33 / 0.67 / 14.4 ms against 0.36 / 0.52 / 13.0 (576 x 576,
# 1536 x 576, 4096^2), at M = 512 2.2 / 5.4 / 116 against 1.1 / 2.4 / 55; int8 at M = 64
# 0.32 / 0.88 / 16.8 against 0.35 / 0.69 / 15.2, at M = 512 2.6 / 7.1 / 130 against 1.1 / 2.9 / 58.
MAX_M = 64


def int4_applies(bits: int, group_size: int, in_features: int, out_features: int) -> bool:
    # PyTorch's packing refuses N % 16 != 0
    return bits == 4 and group_size in GROUPS and in_features % group_size == 0 and out_features % 16 == 0


def int8_applies(bits: int, group_size: int, in_features: int, symmetric: bool) -> bool:
    # K % 16: with other K (torch 2.13) the kernel returns wrong sums (K = 200: 5.6 relative error) or crashes
    return bits == 8 and symmetric and group_size >= in_features and in_features % 16 == 0


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [N, K] (0..15), scales [N, n_groups], zeros [N, n_groups] or None ->
    (PyTorch's packed int4 weight, scales_and_zeros [n_groups, N, 2] in `dtype`)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)
    return packed, scales_and_zeros(scales, zeros, dtype)


def pack_int8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [N, K] (0..255, zero point 128), per-channel scales [N, 1] -> (int8 [N, K], scales [N])."""
    return (codes.to(torch.int16) - 128).to(torch.int8).contiguous(), scales.reshape(-1).to(dtype)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch._weight_int8pack_mm(x, weight, scales)
