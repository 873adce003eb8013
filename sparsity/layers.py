"""`SparseLinear`: a pruned Linear layer stored compressed (sparsity/packing.py).

State (registered buffers, so the state dict is the checkpoint format), by `storage`:
    "nm"       values [out, in * (m - n) / m], indices uint8 [out, packed]   (pattern N:M)
    "bitmask"  mask uint8 [out, ceil(in / 8)], values [nnz]                  (unstructured)
    "dense"    weight [out, in]          (unstructured, when a bitmask would not be smaller)
    bias       [out] (optional), kept in the original dtype
Values keep the dtype of the weight they came from (pruning rounds nothing); `nnz` counts the
kept weights in every storage.

Forward is the reference path (decompress, then matmul), except for 2:4 layers: they call
compress::sp24_linear (cuda/ops.py; eager CPU calls run its implementation directly), which on
CUDA with 16-bit activations of the values' dtype (stored, or made by `prepack`) and K a
multiple of 32 runs the fastest of our Triton kernels (kept values and their 2-bit slots read as
stored, placed in registers), decompress + cuBLAS, and PyTorch's cuSPARSELt matmul, measured per
shape (cuda/int_matmul.py); on CPU, for up to 16 rows of x (decode), a C++ kernel that reads the
kept values and their slots (cuda/cpu_fused.py), for more rows a C++ decompression before
PyTorch's matmul (cuda/cpu_dequantize.py); elsewhere the reference. `prepack(dtype)` makes, once
at load time, the values in the activation dtype and cuSPARSELt's own layout of the weight, so
the checkpoint format stays as it is. `kernel` ("auto" | "reference" | "triton" | "cpu_fused")
picks as QuantLinear's does. (`packing.to_cutlass` converts the N:M storage to the layout of
PyTorch's CUTLASS 2:4 kernels exactly.)
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from compress.cuda import cpu_fused, cusparselt
from compress.cuda.layout import words_of
from compress.cuda.ops import SP24_KERNELS, autocast_input, fused_linear, sp24_linear, sp24_values_supported
from compress.cuda.prepacked import DerivedLayouts
from compress.errors import CompressError

from .masks import check_mask, parse_pattern
from .packing import compress_nm, decompress_nm, index_bits, pack_bitmask, unpack_bitmask

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
log = logging.getLogger(__name__)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class SparseLinear(DerivedLayouts, nn.Module):
    DERIVED = ("_prepacked", "_fused")

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
        self.kernel = "auto"
        self._drop_prepacked()
        self._prepacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None  # made by prepack
        self._fused: cpu_fused.FusedSp24Values | None  # on CPU: the stored layout checked for the C++ matmul

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
    @property
    def runs_sp24_op(self) -> bool:
        return self.storage == "nm" and self.pattern == "2:4"

    def kernel_layout(self) -> tuple[torch.Tensor, torch.Tensor, None]:
        """(kept values [out, in / 2] in their stored dtype, position words int32 [out, ceil(in / 32)],
        no cuSPARSELt weight): the stored bytes as the 2:4 op reads them (cuda/layout.py)."""
        return self.values, words_of(self.indices), None

    def set_kernel(self, kernel: str) -> SparseLinear:
        """The 2:4 op's kernel choice (other storages always run the reference path)."""
        if kernel not in SP24_KERNELS:
            raise ValueError(f"unknown kernel '{kernel}'; choose {', '.join(SP24_KERNELS)}")
        self.kernel = kernel
        return self

    def _derive_layouts(self, dtype: torch.dtype | None) -> None:
        """prepack(dtype) (DerivedLayouts): for a 2:4 layer on CUDA whose kernels take 16-bit
        activations `dtype` (K a multiple of 32): the kept values in `dtype` (a copy only when
        stored in another dtype, e.g. fp32) and, where PyTorch has cuSPARSELt and the shape suits
        it, cuSPARSELt's layout of the weight (one more copy of the kept values, with its
        metadata), which the per-shape choice then weighs against our kernels. Activations of
        another dtype keep the stored values. On CPU, the stored values and positions checked once
        for the fused C++ matmul (cpu_fused.FusedSp24Values), which calls of up to
        cpu_fused.sp24_max_m() rows then take directly."""
        self._prepacked = None
        reads = (self.runs_sp24_op and self.values.is_cpu and cpu_fused.available()
                 and cpu_fused.sp24_float_applies(self.values.dtype, self.in_features))
        self._fused = cpu_fused.FusedSp24Values(*self.kernel_layout()[:2], self.in_features) if reads else None
        if self.runs_sp24_op and dtype in cusparselt.DTYPES and self.values.is_cuda \
                and sp24_values_supported(self.values.to(dtype), self.in_features):
            values = self.values.to(dtype)
            packed = None
            if cusparselt.applies(self.out_features, self.in_features, dtype, self.values.device):
                try:
                    packed = cusparselt.pack(self.dequantized_weight(dtype))
                except RuntimeError as e:  # our kernels still run; log why PyTorch's will not
                    log.info("2:4 layer %dx%d: no cuSPARSELt weight: %s", self.out_features, self.in_features,
                             str(e).splitlines()[0] if str(e) else e)
            self._prepacked = (values, words_of(self.indices), packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)  # under autocast: its dtype, as nn.Linear
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not self.runs_sp24_op:
            return nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)
        self._check_layouts()
        y = fused_linear(x, self._fused, self.kernel, cpu_fused.ACTIVATION_DTYPES)  # decode: checked at prepack
        if y is None:
            prepared = self._prepacked is not None and self._prepacked[0].dtype == x.dtype
            values, positions, packed = self._prepacked if prepared else self.kernel_layout()
            y = sp24_linear(x, values, positions, self.kernel, packed)
        return y if bias is None else y + bias

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
