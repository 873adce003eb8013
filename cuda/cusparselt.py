"""PyTorch's 2:4 sparse matmul through cuSPARSELt (`torch._cslt_sparse_mm`, what
`torch.sparse.to_sparse_semi_structured` runs on Hopper), as one more candidate the per-shape
choice can make for a 2:4 float weight.

Measured on an H200 (benchmarks/kernels.py --kernels sp24, bf16): 1.40-1.58x faster than dense
cuBLAS at M = 4096, but 0.27-0.37x at M = 1 and 0.34-0.50x at M = 16, where our kernels or
decompress + cuBLAS win. It needs its own compressed weight (values and metadata in one tensor),
made at load time (`pack`) from the dense weight: a second copy of the kept values in GPU memory.
Shapes (PyTorch's constraints for 16-bit weights): N and K multiples of 16; x's rows are padded
to a multiple of 8 here.
"""

from __future__ import annotations

import torch

DTYPES = (torch.float16, torch.bfloat16)


def applies(out_features: int, in_features: int, dtype: torch.dtype, device: torch.device) -> bool:
    return (device.type == "cuda" and dtype in DTYPES and out_features % 16 == 0 and in_features % 16 == 0
            and torch.backends.cusparselt.is_available())


def pack(dense: torch.Tensor) -> torch.Tensor:
    """The 2:4 weight [N, K] (16-bit, CUDA, two zeros in every group of 4) compressed for cuSPARSELt."""
    return torch._cslt_compress(dense)


def matmul(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [M, K] (the packed weight's dtype) -> x @ W.T [M, N]."""
    m = x.shape[0]
    pad = (-m) % 8
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    y = torch._cslt_sparse_mm(packed, x.t(), transpose_result=True)  # [M + pad, N]
    return y[:m] if pad else y
