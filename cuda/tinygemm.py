"""PyTorch's own CUDA int4 kernel (`_weight_int4pack_mm`, "tinygemm", the one behind torchao's
int4 weight-only path), as one more candidate the per-shape choice can make.

Measured on an H200 (benchmarks/kernels.py, bf16, group 128): at M = 1 it runs 1.7-2.2x faster
than bf16 cuBLAS, ahead of our Triton kernels; from M = 16 it falls to 0.4-0.6x and at M = 256
to 0.05x, where our kernels or dequantize + cuBLAS win. It needs its own weight layout, made at
load time (`pack`), which costs a second copy of the 4-bit codes in GPU memory.

Layout and semantics: codes uint8 [N, K] are packed two per byte, high nibble first, then
converted by `_convert_weight_to_int4pack`; PyTorch computes w = (q - 8) * scale + zero per
(group, column), so a zero point zp maps to zero = (8 - zp) * scale. bf16 activations only.
"""

from __future__ import annotations

import torch

GROUPS = (32, 64, 128, 256)


def inner_k_tiles(in_features: int) -> int | None:
    return next((t for t in (8, 4, 2) if in_features % (t * 16) == 0), None)


def applies(bits: int, group_size: int, in_features: int, out_features: int) -> bool:
    return (bits == 4 and group_size in GROUPS and in_features % group_size == 0 and out_features % 8 == 0
            and inner_k_tiles(in_features) is not None)


def scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Our scales [N, n_groups] and zero points [N, n_groups] (None: symmetric, 8) as PyTorch's
    int4 kernels (CUDA and CPU) want them: [n_groups, N, 2] of (scale, (8 - zero) * scale)."""
    s = scales.float()
    zero = torch.zeros_like(s) if zeros is None else (8 - zeros.float()) * s
    return torch.stack([s, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """codes uint8 [N, K] (0..15), scales [N, n_groups], zeros [N, n_groups] or None (CUDA tensors)
    -> (packed weight, scales_and_zeros bf16 [n_groups, N, 2])."""
    pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles(codes.shape[1]))
    return packed, scales_and_zeros(scales, zeros, torch.bfloat16)


def matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x bf16 [M, K] -> [M, N]."""
    return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scales_and_zeros)
