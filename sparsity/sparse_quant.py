"""`SparseQuantLinear`: a pruned Linear whose kept weights are also integer-quantized (SparseGPT
with joint quantization), stored with both savings: only the kept weights' codes, plus where
they are.

State (registered buffers, so the state dict is the checkpoint format), by `storage`:
    "nm"       qvalues uint8 [out, packed_row_bytes(in * (m - n) / m, bits)]   kept codes, group by
                                                                              group, in column order
               indices uint8 [out, packed]          each kept code's position in its group of m
                                                    (as SparseLinear's N:M storage, packing.py)
    "bitmask"  mask uint8 [out, ceil(in / 8)]       1 = kept (as SparseLinear's bitmask)
               qvalues uint8 [packed_row_bytes(nnz, bits)]   kept codes in row-major order, one stream
    scales     [out, n_groups], qzeros (asymmetric)  the grid, as QuantLinear's: groups of
                                                    `group_size` columns of the *dense* weight
    bias       [out] (optional), kept in the original dtype

A 2:4 layer at 4 bits with group 128 and float16 scales costs 4 + 2 bits per kept weight plus
16 / 128 bits per weight: 3.125 bits per weight, 19.5% of its bf16 bytes (QuantLinear int4
g128: 4.125, 25.8%). Pruned weights are exactly zero whatever the grid.

Forward: a 2:4 layer calls compress::sp24_int_linear (cuda/ops.py; eager CPU calls run its
implementation directly), which on CUDA runs our fused kernels (kept codes and positions
decompressed in registers, cuda/triton_int.py) or dequantize + cuBLAS, whichever is faster for
the shape, on CPU for a few rows of x (decode) the fused C++ matmul (cuda/cpu_fused.py) and for
more the C++ dequantization before PyTorch's matmul (cuda/cpu_dequantize.py), and elsewhere the
reference; `kernel` ("auto" | "reference" | "triton" | "cpu_fused") picks as QuantLinear's does.
The kernels read the stored bytes as int32 words at 2, 4 and 8 bits, and codes of 3, 5, 6 and 7
bits widened to 4 or 8 (a copy, as QuantLinear's); `prepack` derives that layout once, on the
module's device. Other layers run the reference: decompress the codes, dequantize, zero the
pruned, matmul.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.cuda import cpu_fused
from compress.cuda.layout import words_of
from compress.cuda.ops import SP24_INT_KERNELS, autocast_input, fused_linear, sp24_int_linear
from compress.cuda.prepacked import DerivedLayouts
from compress.errors import CompressError
from compress.quant.layers import GridBuffers
from compress.quant.packing import pack_codes, packed_row_bytes, unpack_codes
from compress.quant.quantize import QuantGrid, dequantize

from .layers import DTYPES, dtype_name
from .masks import check_mask, parse_pattern
from .packing import compress_nm, decompress_nm, index_bits, pack_bitmask, unpack_bitmask


class SparseQuantLinear(DerivedLayouts, GridBuffers, nn.Module):
    DERIVED = ("_prepacked", "_fused")

    def __init__(self, in_features: int, out_features: int, pattern: str, storage: str, nnz: int, bits: int,
                 group_size: int, symmetric: bool, bias: bool, scale_dtype: str = "float16",
                 bias_dtype: str = "float32", device: torch.device | str | None = None) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {bits}")
        if not 1 <= group_size <= in_features:
            raise ValueError(f"group_size must be in [1, {in_features}], got {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.pattern, self.storage, self.nnz = pattern, storage, nnz
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.scale_dtype, self.bias_dtype = scale_dtype, bias_dtype
        u8 = {"dtype": torch.uint8, "device": device}
        if storage == "nm":
            n, m = parse_pattern(pattern)
            kept = in_features // m * (m - n)
            if in_features % m or nnz != out_features * kept:
                raise ValueError(f"nnz {nnz} is not {out_features} x {kept} for pattern {pattern}")
            self.register_buffer("qvalues", torch.empty(out_features, packed_row_bytes(kept, bits), **u8))
            self.register_buffer("indices", torch.empty(out_features, packed_row_bytes(kept, index_bits(m)), **u8))
        elif storage == "bitmask":
            self.register_buffer("mask", torch.empty(out_features, -(-in_features // 8), **u8))
            self.register_buffer("qvalues", torch.empty(packed_row_bytes(nnz, bits), **u8))
        else:
            raise ValueError(f"unknown storage '{storage}'")
        self._register_grid(device)
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=DTYPES[bias_dtype], device=device))
        else:
            self.bias = None
        self.kernel = "auto"
        self._drop_prepacked()
        self._prepacked: tuple[torch.Tensor, ...] | None  # the kernels' layout, made by prepack
        self._fused: cpu_fused.FusedSp24Weight | None  # _prepacked checked for the fused CPU matmul

    @classmethod
    def from_codes(cls, codes: torch.Tensor, keep: torch.Tensor, grid: QuantGrid, pattern: str, ratio: float | None,
                   bias: torch.Tensor | None, scale_dtype: str, where: str) -> SparseQuantLinear:
        """Store codes uint8 [out, in] on `grid` (scales already representable in `scale_dtype`)
        where `keep` (bool [out, in]) is True, after checking that the mask has exactly the pattern
        and ratio asked for (CompressError naming `where` otherwise)."""
        check_mask(keep, pattern, ratio, where)
        out, cols = codes.shape
        nm = parse_pattern(pattern)
        nnz = int(keep.sum())
        bias_dtype = dtype_name(bias.dtype) if bias is not None else "float32"
        m = cls(cols, out, pattern, "nm" if nm is not None else "bitmask", nnz, grid.bits, grid.group_size,
                grid.symmetric, bias is not None, scale_dtype, bias_dtype, device=codes.device)
        if nm is not None:
            kept, indices = compress_nm(codes, keep, *nm)  # [out, kept] codes, packed positions
            m.qvalues.copy_(pack_codes(kept, grid.bits))
            m.indices.copy_(indices)
        else:
            m.mask.copy_(pack_bitmask(keep))
            if nnz:  # a layer pruned entirely keeps no codes
                m.qvalues.copy_(pack_codes(codes[keep].view(1, -1), grid.bits).view(-1))
        m._store_grid(grid)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    # --- the reference semantics -------------------------------------------------------------
    def codes_and_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes uint8 [out, in], 0 where pruned; keep bool [out, in])."""
        if self.storage == "nm":
            n, m = parse_pattern(self.pattern)
            kept = unpack_codes(self.qvalues, self.bits, self.in_features // m * (m - n))  # [out, kept]
            codes = decompress_nm(kept, self.indices, n, m, self.in_features)
            keep = decompress_nm(torch.ones_like(kept), self.indices, n, m, self.in_features).bool()
            return codes, keep
        keep = unpack_bitmask(self.mask, self.in_features)
        codes = torch.zeros(self.out_features, self.in_features, dtype=torch.uint8, device=keep.device)
        if self.nnz:
            codes[keep] = unpack_codes(self.qvalues.view(1, -1), self.bits, self.nnz).view(-1)
        return codes, keep

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [out, in] this module computes with."""
        codes, keep = self.codes_and_mask()
        return dequantize(codes, self.grid()).mul_(keep).to(dtype)

    # --- kernels ---------------------------------------------------------------------------------
    @property
    def runs_sp24_op(self) -> bool:
        return self.storage == "nm" and self.pattern == "2:4"

    def kernel_layout(self) -> tuple[torch.Tensor, ...]:
        """(kept-code words int32 [out, n_words] of `kernel_bits` codes, position words int32 [out,
        n_pos_words], scales [n_groups, out], zeros uint8 [n_groups, out] or None), cuda/layout.py."""
        return (self.kernel_words(self.qvalues, self.in_features // 2), words_of(self.indices),
                *self.kernel_grid())

    def set_kernel(self, kernel: str) -> SparseQuantLinear:
        if kernel not in SP24_INT_KERNELS:
            raise ValueError(f"unknown kernel '{kernel}'; choose {', '.join(SP24_INT_KERNELS)}")
        self.kernel = kernel
        return self

    def _derive_layouts(self, dtype: torch.dtype | None) -> None:
        """prepack(): the kernels' layout (DerivedLayouts; any `dtype`); on CPU also checked once for
        the fused C++ matmul (cpu_fused.FusedSp24Weight), which calls of up to cpu_fused.sp24_max_m
        rows (by its groups) then take directly."""
        self._prepacked = self.kernel_layout() if self.runs_sp24_op else None
        kb, k = self.kernel_bits, self.in_features
        reads = (self._prepacked is not None and self.qvalues.is_cpu and cpu_fused.available()
                 and cpu_fused.sp24_applies(kb, self.group_size, k))
        self._fused = cpu_fused.FusedSp24Weight(*self._prepacked, kb, self.group_size, k) if reads else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)  # under autocast: its dtype, as nn.Linear
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not self.runs_sp24_op:
            return nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)
        self._check_layouts()
        y = fused_linear(x, self._fused, self.kernel, cpu_fused.ACTIVATION_DTYPES)  # decode: checked at prepack
        if y is None:
            y = sp24_int_linear(x, *(self._prepacked or self.kernel_layout()), self.kernel_bits, self.group_size,
                                self.in_features, self.kernel)
        return y if bias is None else y + bias

    def sparsity(self) -> float:
        """Fraction of the layer's weights pruned."""
        return 1 - self.nnz / self.num_weights()

    # --- CompressedModule ----------------------------------------------------------------------
    def format_spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "pattern": self.pattern,
                "storage": self.storage, "nnz": self.nnz, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "bias": self.bias is not None, "scale_dtype": self.scale_dtype,
                "bias_dtype": self.bias_dtype}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: torch.device | str = "meta") -> SparseQuantLinear:
        try:
            return cls(**spec, device=device)
        except (TypeError, ValueError, KeyError) as e:
            raise CompressError(f"SparseQuantLinear: bad spec {spec}: {e}") from None

    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for name, t in self.named_buffers() if name != "bias")

    def describe(self) -> str:
        where = self.pattern if self.storage == "nm" else "unstructured"
        group = "per-channel" if self.group_size >= self.in_features else f"g{self.group_size}"
        return (f"{where} sparse ({self.sparsity():.1%}) + int{self.bits} {group} "
                f"{'sym' if self.symmetric else 'asym'}")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.describe()}"
