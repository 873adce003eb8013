"""`QuantLinear`: a Linear layer whose weight is stored as packed low-bit integer codes.

State (registered buffers, so the state dict is the checkpoint format):
    qweight  uint8 [out, packed_row_bytes(in, bits)]       codes, bit-packed per row (packing.py)
    scales   scale_dtype [out, n_groups]                   one scale per (row, group)
    qzeros   uint8 [n_groups, packed_row_bytes(out, bits)] zero points, packed along `out` (rows of
                                                           groups are short; columns of outputs are not)
                                                           (asymmetric only; absent if symmetric)
    bias     [out] (optional), kept in the original dtype

Forward calls compress.cuda.ops.int_linear, which picks the kernel (`kernel`, per module:
"auto" | "reference" | "triton" | "cpu_packed" | "cpu_fused"). The kernels read a layout derived from this state
by `prepack()` (cuda/layout.py: the packed bytes viewed as int32 words, scales and zero points
transposed to [n_groups, out]); without it the derived tensors are made on the fly. Codes of 3,
5, 6 and 7 bits, which straddle bytes in the checkpoint, are widened there to 4 or 8 bits (the
same weight, in a copy: cuda/layout.py `widen_codes`), so every width runs the kernels, PyTorch's
packed matmuls included, as the next width the kernels read; such a layer keeps one derived copy
(`prepack`), so it never holds more memory than a layer of the wider width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.cuda import cpu_fused, cpu_packed, tinygemm
from compress.cuda.cpu_fp8 import FusedFp8
from compress.cuda.fp8_ops import KERNELS as FP8_KERNELS
from compress.cuda.fp8_ops import fp8_linear
from compress.cuda.layout import KERNEL_BITS, kernel_bits, unpack_words, widen_codes, words_of
from compress.cuda.ops import (KERNELS, CpuPacked, autocast_input, cpu_packed_linear, cpu_packed_serves, fused_linear,
                               int_linear)
from compress.cuda.prepacked import DerivedLayouts

from .packing import pack_codes, packed_row_bytes, unpack_codes
from .quantize import QuantGrid, dequantize, num_groups

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
WIDEN_CODES = 2**22  # codes widened at a time: unpack + repack hold ~15 bytes per code (60 MB), not a layer's worth


class GridBuffers:
    """The stored grid of a layer with `bits`, `group_size`, `symmetric`, `scale_dtype`,
    `in_features` and `out_features` (mixed into an nn.Module): buffers scales [out, n_groups]
    and, asymmetric, qzeros uint8 [n_groups, packed_row_bytes(out, bits)]."""

    def _register_grid(self, device: torch.device | str | None) -> None:
        groups = num_groups(self.in_features, self.group_size)
        self.register_buffer("scales", torch.empty(self.out_features, groups, dtype=_DTYPES[self.scale_dtype],
                                                   device=device))
        if self.symmetric:
            self.qzeros = None
        else:
            self.register_buffer("qzeros", torch.empty(groups, packed_row_bytes(self.out_features, self.bits),
                                                       dtype=torch.uint8, device=device))

    def _store_grid(self, grid: QuantGrid) -> None:
        self.scales.copy_(grid.scales)
        if grid.zeros is not None:
            self.qzeros.copy_(pack_codes(grid.zeros.to(torch.uint8).T, grid.bits))

    def kernel_grid(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The grid as the kernels read it (cuda/layout.py): (scales [n_groups, out], zeros uint8
        [n_groups, out] or None)."""
        return self.scales.T.contiguous(), self.kernel_zeros()

    def kernel_zeros(self) -> torch.Tensor | None:
        """Zero points uint8 [n_groups, out] unpacked from the stored ones, or None if symmetric."""
        return None if self.qzeros is None else unpack_codes(self.qzeros, self.bits, self.out_features).contiguous()

    @property
    def kernel_bits(self) -> int:
        """The width the kernels read this layer's codes at (cuda/layout.py)."""
        return kernel_bits(self.bits)

    def kernel_words(self, packed: torch.Tensor, n: int) -> torch.Tensor:
        """The int32 words [rows, n_words] the kernels read for `n` codes a row stored bit-packed
        in `packed` uint8 [rows, bytes]: the stored bytes themselves (a view where the row length
        allows) at 2, 4 and 8 bits, else the codes widened to `kernel_bits` (a copy; zero points
        unchanged: asymmetric codes stay, symmetric ones shift to the wider symmetric zero)."""
        if self.bits in KERNEL_BITS:
            return words_of(packed)
        rows = max(1, WIDEN_CODES // n)
        return torch.cat([words_of(pack_codes(widen_codes(unpack_codes(block, self.bits, n), self.bits, self.symmetric),
                                              self.kernel_bits)) for block in packed.split(rows)])

    def grid(self) -> QuantGrid:
        zeros = None
        if self.qzeros is not None:
            zeros = unpack_codes(self.qzeros, self.bits, self.out_features).T.float()  # [out, n_groups]
        return QuantGrid(self.bits, self.group_size, self.scales.float(), zeros)


class QuantLinear(DerivedLayouts, GridBuffers, nn.Module):
    DERIVED = ("_prepacked", "_cpu_packed", "_tinygemm", "_fused")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        symmetric: bool,
        bias: bool,
        scale_dtype: str = "float16",
        bias_dtype: str = "float32",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {bits}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.scale_dtype, self.bias_dtype = scale_dtype, bias_dtype
        self.register_buffer(
            "qweight", torch.empty(out_features, packed_row_bytes(in_features, bits), dtype=torch.uint8, device=device)
        )
        self._register_grid(device)
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=_DTYPES[bias_dtype], device=device))
        else:
            self.bias = None
        self.kernel = "auto"
        self._drop_prepacked()
        self._prepacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None  # kernel_layout()
        self._fused: cpu_fused.FusedWeight | None  # _prepacked checked for the fused CPU matmul
        self._cpu_packed: CpuPacked | None
        self._tinygemm: tuple[torch.Tensor, torch.Tensor] | None

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, grid: QuantGrid, bias: torch.Tensor | None, scale_dtype: str
    ) -> QuantLinear:
        """Build from codes uint8 [out, in] on `grid` (whose scales are already representable in
        `scale_dtype`, see quantize.cast_grid)."""
        out, n = codes.shape
        bias_dtype = str(bias.dtype).removeprefix("torch.") if bias is not None else "float32"
        m = cls(n, out, grid.bits, grid.group_size, grid.symmetric, bias is not None, scale_dtype, bias_dtype,
                device=codes.device)
        m.qweight.copy_(pack_codes(codes, grid.bits))
        m._store_grid(grid)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    # --- the reference semantics -------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [out, in] this module computes with."""
        return dequantize(self.codes(), self.grid(), dtype)

    def tied_embedding(self, name: str, embedding: nn.Module) -> nn.Module | None:
        """Embeddings that read this layer's codes (quant/embedding.py), for `embedding` whose
        weight this layer's float weight was (a head `name` tied to the input embeddings); None
        where they would compute something else: embeddings other than a plain nn.Embedding of
        this shape (max_norm renormalizes rows)."""
        from .embedding import QuantEmbedding

        plain = (type(embedding) is nn.Embedding and embedding.max_norm is None
                 and embedding.weight.shape == (self.out_features, self.in_features))
        return QuantEmbedding.reading(self, name, embedding.weight.dtype) if plain else None

    def grid_zeros(self) -> torch.Tensor | None:
        """Zero points uint8 [n_groups, out] (None if symmetric): the prepacked ones where derived,
        else unpacked now (kernel_zeros)."""
        return self._prepacked[2] if self._prepacked is not None else self.kernel_zeros()

    # --- kernels ---------------------------------------------------------------------------------
    def set_kernel(self, kernel: str) -> QuantLinear:
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel '{kernel}'; choose one of {', '.join(KERNELS)}")
        self.kernel = kernel
        return self

    def kernel_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(words int32 [out, n_words] of `kernel_bits` codes, scales [n_groups, out], zeros uint8
        [n_groups, out] or None)."""
        return self.kernel_words(self.qweight, self.in_features), *self.kernel_grid()

    def _derive_layouts(self, dtype: torch.dtype | None) -> None:
        """prepack(dtype): the kernels' layout of the stored state (DerivedLayouts). With `dtype`
        bfloat16, also PyTorch's packed weight where the format allows: int4 / int8 on CPU, int4
        (tinygemm, a second copy of the codes) on CUDA, for the kernel choice to weigh. Codes of 3, 5, 6 and 7
        bits take the paths of their kernel width from one derived copy beside the stored codes, so
        that they never hold more than the wider width does (3-bit: 3 + 4 bits per weight against
        4 + 4): on CPU the packed weight where it applies (calls it does not serve, other
        activation dtypes or a forced "reference" / "triton" kernel, widen the codes per call),
        else the widened words (on CUDA without tinygemm's copy). On CPU the words are also checked
        once for the fused C++ matmul (cpu_fused.FusedWeight), which fp32 calls then take directly."""
        self._prepacked = self.kernel_layout()
        self._cpu_packed, self._tinygemm = None, None
        if dtype != torch.bfloat16:
            self._check_fused()
            return
        device, k, kb, grid = self.qweight.device.type, self.in_features, self.kernel_bits, self.grid()
        widened = kb != self.bits

        def codes() -> torch.Tensor:  # uint8 [out, in] at the kernel width, from the words (no int32 copy)
            return unpack_words(self._prepacked[0], kb, k)

        if device == "cuda" and not widened and tinygemm.applies(kb, self.group_size, k, self.out_features):
            self._tinygemm = tinygemm.pack(codes(), grid.scales, grid.zeros)
        elif device == "cpu" and cpu_packed.int4_applies(kb, self.group_size, k, self.out_features):
            self._cpu_packed = CpuPacked(*cpu_packed.pack_int4(codes(), grid.scales, grid.zeros, dtype), dtype)
        elif device == "cpu" and cpu_packed.int8_applies(kb, self.group_size, k, grid.zeros is None):
            self._cpu_packed = CpuPacked(*cpu_packed.pack_int8(codes(), grid.scales, dtype), dtype)
        if widened and self._cpu_packed is not None:
            self._prepacked = None
        self._check_fused()

    def _check_fused(self) -> None:
        """The prepacked words checked once for the fused CPU matmul (`_fused`), where it reads them."""
        kb, k = self.kernel_bits, self.in_features
        reads = (self._prepacked is not None and self.qweight.is_cpu and cpu_fused.available()
                 and cpu_fused.applies(kb, self.group_size, k))
        self._fused = cpu_fused.FusedWeight(*self._prepacked, kb, self.group_size, k) if reads else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)  # under autocast: its dtype, as nn.Linear
        bias = None if self.bias is None else self.bias.to(x.dtype)
        self._check_layouts()
        y = fused_linear(x, self._fused, self.kernel)  # a decoded token's call: checked at prepack
        if y is None:
            y = self._linear(x)
        return y if bias is None else y + bias

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_packed_serves(self.kernel, self._cpu_packed, x, self._prepacked is not None):  # words unread
            return cpu_packed_linear(x, self._cpu_packed, self.kernel_bits, self.group_size, self.in_features)
        words, scales, zeros = self._prepacked or self.kernel_layout()
        return int_linear(x, words, scales, zeros, self.kernel_bits, self.group_size, self.in_features, self.kernel,
                          self._cpu_packed, self._tinygemm)

    # --- CompressedModule ----------------------------------------------------------------------
    def format_spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "bias": self.bias is not None,
            "scale_dtype": self.scale_dtype,
            "bias_dtype": self.bias_dtype,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: torch.device | str = "meta") -> QuantLinear:
        return cls(**spec, device=device)

    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def storage_bytes(self) -> int:
        tensors = [self.qweight, self.scales] + ([self.qzeros] if self.qzeros is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def describe(self) -> str:
        group = "per-channel" if self.group_size >= self.in_features else f"g{self.group_size}"
        return f"int{self.bits} {group} {'sym' if self.symmetric else 'asym'}"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.describe()}"


class FP8Linear(DerivedLayouts, nn.Module):
    """A Linear layer whose weight is stored in float8 e4m3 with one scale per output channel.

    State:
        weight_fp8  float8_e4m3fn [out, in]   weight / scale, rounded to e4m3 (max 448)
        scales      scale_dtype [out, 1]      per-output-channel absmax / 448
        bias        [out] (optional)

    Forward runs compress::fp8_linear (cuda/fp8_ops.py), whose reference upcasts, rescales in
    fp32, casts to the activation dtype and multiplies; on CPU its C++ kernels decode the codes
    in the matmul (cuda/cpu_fp8.py), which `prepack` checks once for the calls that take them
    directly.
    """

    E4M3_MAX = 448.0
    DERIVED = ("_fused",)
    kernel = "auto"  # also for modules pickled before layers had one

    def __init__(self, in_features: int, out_features: int, bias: bool, scale_dtype: str = "float32",
                 bias_dtype: str = "float32", device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scale_dtype, self.bias_dtype = scale_dtype, bias_dtype
        self.register_buffer("weight_fp8", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                       device=device))
        self.register_buffer("scales", torch.empty(out_features, 1, dtype=_DTYPES[scale_dtype], device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=_DTYPES[bias_dtype], device=device))
        else:
            self.bias = None
        self.kernel = "auto"
        self._drop_prepacked()
        self._fused: FusedFp8 | None  # the weight checked for the fused CPU matmul

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, scale_dtype: str) -> FP8Linear:
        """Quantize weight [out, in] per output channel (the scales are rounded to their storage dtype first)."""
        out, n = weight.shape
        bias_dtype = str(bias.dtype).removeprefix("torch.") if bias is not None else "float32"
        m = cls(n, out, bias is not None, scale_dtype, bias_dtype, device=weight.device)
        info = torch.finfo(_DTYPES[scale_dtype])
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1, keepdim=True) / cls.E4M3_MAX).clamp(info.tiny, info.max)
        scales = scales.to(_DTYPES[scale_dtype]).float()
        m.weight_fp8.copy_((w / scales).clamp(-cls.E4M3_MAX, cls.E4M3_MAX).to(torch.float8_e4m3fn))
        m.scales.copy_(scales)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight_fp8.float() * self.scales.float()).to(dtype)

    def set_kernel(self, kernel: str) -> FP8Linear:
        if kernel not in FP8_KERNELS:
            raise ValueError(f"unknown kernel '{kernel}'; choose one of {', '.join(FP8_KERNELS)}")
        self.kernel = kernel
        return self

    def _derive_layouts(self, dtype: torch.dtype | None) -> None:
        """prepack: on CPU, the weight checked once for the fused C++ matmul (DerivedLayouts)."""
        fits = self.weight_fp8.is_cpu and cpu_fused.available()
        self._fused = FusedFp8(self.weight_fp8, self.scales) if fits else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)  # under autocast: its dtype, as nn.Linear
        bias = None if self.bias is None else self.bias.to(x.dtype)
        self._check_layouts()
        y = fused_linear(x, self._fused, self.kernel)  # a decoded token's fp32 call (fp8_ops: 16-bit x)
        if y is None:
            y = fp8_linear(x, self.weight_fp8, self.scales, self.kernel)
        return y if bias is None else y + bias

    def format_spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "scale_dtype": self.scale_dtype, "bias_dtype": self.bias_dtype}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: torch.device | str = "meta") -> FP8Linear:
        return cls(**spec, device=device)

    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight_fp8, self.scales))

    def describe(self) -> str:
        return "fp8 e4m3 per-channel"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.describe()}"
