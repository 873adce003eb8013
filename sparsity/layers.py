"""`SparseLinear`: a pruned Linear layer stored compressed (sparsity/packing.py).

State (registered buffers, so the state dict is the checkpoint format), by `storage`:
    "nm"       values [out, in * (m - n) / m], indices uint8 [out, packed]   (pattern N:M)
    "bitmask"  mask uint8 [out, ceil(in / 8)], values [nnz]                  (unstructured)
    "dense"    weight [out, in]          (unstructured, when a bitmask would not be smaller)
    bias       [out] (optional), kept in the original dtype
Values keep the dtype of the weight they came from (pruning rounds nothing); `nnz` counts the
kept weights in every storage.

Forward is the reference path (decompress, then matmul), except for a 2:4 layer that `prepack`
prepared on CUDA for 16-bit activations: that one runs PyTorch's semi-structured sparse matmul
(cuSPARSELt where PyTorch ships it, else CUTLASS), whose layout is made once at load time, so the
checkpoint format stays as it is. (`packing.to_cutlass` converts the N:M storage to CUTLASS's
layout exactly, without decompressing.)
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError

from .masks import check_mask, parse_pattern
from .packing import compress_nm, decompress_nm, index_bits, pack_bitmask, unpack_bitmask

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
log = logging.getLogger(__name__)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _semi_structured(dense: torch.Tensor) -> torch.Tensor | None:
    """PyTorch's 2:4 sparse weight of `dense` (16-bit, CUDA): cuSPARSELt where this build has it,
    else CUTLASS's kernels, which exist for compute capability 8.x only (on Hopper they fail at
    the first matmul); None where neither runs."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    if torch.backends.cusparselt.is_available():
        return SparseSemiStructuredTensorCUSPARSELT.from_dense(dense)
    if torch.cuda.get_device_capability(dense.device)[0] == 8:
        return SparseSemiStructuredTensorCUTLASS.from_dense(dense)
    return None


class SparseLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, pattern: str, storage: str, nnz: int, value_dtype: str,
                 bias: bool, bias_dtype: str = "float32", device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.pattern, self.storage, self.nnz = pattern, storage, nnz
        self.value_dtype, self.bias_dtype = value_dtype, bias_dtype
        dtype = DTYPES[value_dtype]
        if storage == "nm":
            n, m = parse_pattern(pattern)
            kept = in_features // m * (m - n)
            if nnz != out_features * kept:
                raise ValueError(f"nnz {nnz} is not {out_features} x {kept} for pattern {pattern}")
            self.register_buffer("values", torch.empty(out_features, kept, dtype=dtype, device=device))
            row_bytes = -(-kept // 8) * index_bits(m)
            self.register_buffer("indices", torch.empty(out_features, row_bytes, dtype=torch.uint8, device=device))
        elif storage == "bitmask":
            self.register_buffer("mask", torch.empty(out_features, -(-in_features // 8), dtype=torch.uint8,
                                                     device=device))
            self.register_buffer("values", torch.empty(nnz, dtype=dtype, device=device))
        elif storage == "dense":
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=dtype, device=device))
        else:
            raise ValueError(f"unknown storage '{storage}'")
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=DTYPES[bias_dtype], device=device))
        else:
            self.bias = None
        self._semi_structured: torch.Tensor | None = None  # PyTorch's 2:4 sparse weight, made by prepack

    @classmethod
    def from_pruned(cls, weight: torch.Tensor, keep: torch.Tensor, pattern: str, ratio: float | None,
                    bias: torch.Tensor | None, where: str) -> SparseLinear:
        """Store `weight` [out, in] pruned to `keep` (bool, True = kept), after checking that the mask
        has exactly the pattern and ratio asked for (CompressError naming `where` otherwise)."""
        check_mask(keep, pattern, ratio, where)
        out, cols = weight.shape
        w = weight.detach() * keep
        nnz = int(keep.sum())
        nm = parse_pattern(pattern)
        value_bytes = w.element_size()
        if nm is not None:
            storage = "nm"
        elif out * -(-cols // 8) + nnz * value_bytes < out * cols * value_bytes:
            storage = "bitmask"
        else:
            storage = "dense"
        bias_dtype = dtype_name(bias.dtype) if bias is not None else "float32"
        m = cls(cols, out, pattern, storage, nnz, dtype_name(w.dtype), bias is not None, bias_dtype, device=w.device)
        if storage == "nm":
            values, indices = compress_nm(w, keep, *nm)
            m.values.copy_(values)
            m.indices.copy_(indices)
        elif storage == "bitmask":
            m.mask.copy_(pack_bitmask(keep))
            m.values.copy_(w[keep])
        else:
            m.weight.copy_(w)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    # --- the reference semantics -------------------------------------------------------------
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [out, in] this module computes with."""
        if self.storage == "nm":
            n, m = parse_pattern(self.pattern)
            return decompress_nm(self.values, self.indices, n, m, self.in_features).to(dtype)
        if self.storage == "bitmask":
            dense = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.values.device)
            dense[unpack_bitmask(self.mask, self.in_features)] = self.values.to(dtype)
            return dense
        return self.weight.to(dtype)

    # --- kernels ---------------------------------------------------------------------------------
    def prepack(self, dtype: torch.dtype | None = None) -> SparseLinear:
        """On CUDA, for a 2:4 layer and 16-bit activations `dtype`: PyTorch's semi-structured sparse
        weight, which forward then uses for activations of that dtype (a second copy of the kept
        values beside the checkpoint's). Layers whose shapes PyTorch's sparse kernels do not take
        keep the reference path (logged)."""
        self._semi_structured = None
        if self.storage == "nm" and self.pattern == "2:4" and dtype in (torch.float16, torch.bfloat16) \
                and self.values.is_cuda:
            try:
                self._semi_structured = _semi_structured(self.dequantized_weight(dtype))
            except (RuntimeError, ValueError) as e:
                log.info("2:4 layer %dx%d stays on the reference path: %s", self.out_features, self.in_features,
                         str(e).splitlines()[0] if str(e) else e)
        return self

    def _apply(self, fn, recurse=True):  # .to() / .cuda(): the prepared weight would be stale
        self._semi_structured = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # new weights: likewise
        self._semi_structured = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self._semi_structured is not None and x.dtype == self._semi_structured.dtype:
            return nn.functional.linear(x, self._semi_structured, bias)
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)

    def sparsity(self) -> float:
        """Fraction of the layer's weights pruned."""
        return 1 - self.nnz / self.num_weights()

    # --- CompressedModule ----------------------------------------------------------------------
    def format_spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "pattern": self.pattern,
                "storage": self.storage, "nnz": self.nnz, "value_dtype": self.value_dtype,
                "bias": self.bias is not None, "bias_dtype": self.bias_dtype}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: torch.device | str = "meta") -> SparseLinear:
        try:
            return cls(**spec, device=device)
        except (TypeError, ValueError, KeyError) as e:
            raise CompressError(f"SparseLinear: bad spec {spec}: {e}") from None

    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for name, t in self.named_buffers() if name != "bias")

    def describe(self) -> str:
        if self.storage == "nm":
            return f"{self.pattern} sparse ({self.sparsity():.1%})"
        return f"unstructured {self.sparsity():.1%} sparse ({self.storage})"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.describe()}"
