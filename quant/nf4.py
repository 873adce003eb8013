"""NF4 / FP4 block-wise 4-bit weights through bitsandbytes (data-free), with double quantization.

The weight [out, in] is flattened and cut into blocks of `block_size` values (a block may span
rows; a weight whose size is not a multiple of the block size gets a shorter last block). Each
block is scaled by its absolute maximum and every value is rounded to the nearest of 16 levels:
NF4 (quantiles of a normal distribution, QLoRA) or FP4 (a tiny float). With double quantization
(bitsandbytes' `compress_statistics`) the per-block absmax are themselves stored as 8-bit codes
(bitsandbytes' dynamic map) in blocks of 256, minus their mean, with one float32 scale per block.

`NF4Linear` holds exactly bitsandbytes' tensors, so its weight is bit-identical to what
`bitsandbytes.functional.dequantize_4bit` computes, and `to_bnb_linear4bit()` hands the same
packed weight to a `bitsandbytes.nn.Linear4bit` (QLoRA's base layer). bitsandbytes' own packed
metadata tensor (`quant_state.bitsandbytes__nf4`, a JSON blob whose length depends on the digits
of a float) is not stored: its fields live in the module spec, and the nested offset in a float32
buffer, so every buffer's shape follows from the spec.

bitsandbytes is imported only when a weight is quantized, dequantized, multiplied or prepacked on CPU.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from compress.cuda import cpu_fused
from compress.cuda.cpu_nf4 import MAX_M, FusedNf4, absmax_fp32, applies
from compress.cuda.ops import _direct, autocast_input
from compress.cuda.prepacked import DerivedLayouts
from compress.errors import CompressError
from compress.interfaces import MethodConfig

from .layers import _DTYPES

# bitsandbytes 0.50 quantizes the absmax (double quantization) in blocks of 256 with float32
# scales, and its fused kernels accept nothing else: part of this format's definition.
NESTED_BLOCK_SIZE = 256


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        raise CompressError("the nf4 method needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class NF4Config(MethodConfig):
    """NF4 or FP4 4-bit weights in blocks, with double-quantized scales, via bitsandbytes (data-free)."""

    method: Literal["nf4"] = "nf4"
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4",
        description="4-bit data type: 'nf4' (normal-float levels, best for bell-shaped weights) or 'fp4' (e2m1 float).",
    )
    block_size: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = Field(
        64,
        description="Consecutive weights (row-major over the flattened weight) sharing one absmax scale.",
    )
    double_quant: bool = Field(
        True,
        description="Store the block scales as 8-bit codes with one float32 scale per 256 blocks "
        "(bitsandbytes' compress_statistics): about 4.13 instead of 4.5 bits per weight at block 64.",
    )

    def build(self) -> NF4Compressor:
        return NF4Compressor(self)


class NF4Compressor:
    def __init__(self, config: NF4Config) -> None:
        self.config = config

    @torch.no_grad()
    def compress(self, name: str, module: nn.Linear) -> NF4Linear:
        """Quantize one Linear into an NF4Linear (the input module is not modified)."""
        c = self.config
        w = module.weight.detach()
        if w.dtype not in _DTYPES.values():
            raise CompressError(
                f"nf4 cannot quantize {name} (Linear {module.in_features} -> {module.out_features}): its weight is "
                f"{_dtype_name(w.dtype)}; bitsandbytes takes float32, float16 or bfloat16 weights"
            )
        return NF4Linear.from_weight(w, module.bias, c.quant_type, c.block_size, c.double_quant)


class NF4Linear(DerivedLayouts, nn.Module):
    """A Linear layer whose weight is stored as bitsandbytes NF4/FP4 codes.

    State (n = in * out, blocks = ceil(n / block_size)):
        weight_packed     uint8 [(n + 1) // 2, 1]   two 4-bit codes per byte, row-major (bnb's layout)
        absmax            float32 [blocks]          per-block absmax            (without double quant)
                          uint8 [blocks]            8-bit codes of absmax - mean (with double quant)
        quant_map         float32 [16]              the 16 levels (bnb's quant_map)
        nested_absmax     float32 [ceil(blocks / 256)]   scales of the absmax codes  (double quant only)
        nested_quant_map  float32 [256]                  bnb's dynamic 8-bit map     (double quant only)
        nested_offset     float32 []                     mean of the absmax          (double quant only)
        bias              [out] (optional), kept in its dtype

    `weight_dtype` is the dtype the weight had, which bitsandbytes dequantizes to.
    Forward: on CUDA bitsandbytes' `matmul_4bit` (kernel="auto"); on CPU, for eager calls that
    record no gradient, C++ kernels (cuda/cpu_nf4.py: up to MAX_M rows of x the matmul with the
    codes decoded in it, beyond that bitsandbytes' weight dequantized a block of rows at a time),
    their layout checked once by `prepack` (the loader calls it; without it, derived per call);
    elsewhere, or with kernel="reference", bitsandbytes' dequantization, a cast to the activation
    dtype, `F.linear`.
    """

    KERNELS = ("auto", "reference")
    DERIVED = ("_fused",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        quant_type: str = "nf4",
        block_size: int = 64,
        double_quant: bool = True,
        bias: bool = False,
        weight_dtype: str = "float32",
        bias_dtype: str = "float32",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.block_size, self.double_quant = quant_type, block_size, double_quant
        self.weight_dtype, self.bias_dtype = weight_dtype, bias_dtype
        self.kernel = "auto"
        n = in_features * out_features
        blocks = -(n // -block_size)

        def buf(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))

        buf("weight_packed", ((n + 1) // 2, 1), torch.uint8)
        buf("absmax", (blocks,), torch.uint8 if double_quant else torch.float32)
        buf("quant_map", (16,), torch.float32)
        if double_quant:
            buf("nested_absmax", (-(blocks // -NESTED_BLOCK_SIZE),), torch.float32)
            buf("nested_quant_map", (256,), torch.float32)
            buf("nested_offset", (), torch.float32)
        else:
            self.nested_absmax = self.nested_quant_map = self.nested_offset = None
        if bias:
            buf("bias", (out_features,), _DTYPES[bias_dtype])
        else:
            self.bias = None
        self._drop_prepacked()
        self._fused: FusedNf4 | None  # the weight checked for the C++ CPU kernels (prepack)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, quant_type: str, block_size: int,
                    double_quant: bool) -> NF4Linear:
        """Quantize weight [out, in] with bitsandbytes' quantize_4bit (on the weight's device)."""
        F = _bnb().functional
        out, n = weight.shape
        packed, state = F.quantize_4bit(weight.detach().contiguous(), blocksize=block_size, quant_type=quant_type,
                                        compress_statistics=double_quant, quant_storage=torch.uint8)
        m = cls(n, out, quant_type, block_size, double_quant, bias is not None, _dtype_name(weight.dtype),
                _dtype_name(bias.dtype) if bias is not None else "float32", device=weight.device)
        m._fill("weight_packed", packed)
        m._fill("absmax", state.absmax)
        m._fill("quant_map", state.code)
        if double_quant:
            if state.state2.blocksize != NESTED_BLOCK_SIZE or state.state2.dtype != torch.float32:
                raise CompressError(
                    f"this bitsandbytes ({_bnb().__version__}) double-quantizes in blocks of {state.state2.blocksize} "
                    f"({state.state2.dtype}); the nf4 format needs {NESTED_BLOCK_SIZE} (float32): "
                    "use double_quant: false or bitsandbytes 0.50"
                )
            m._fill("nested_absmax", state.state2.absmax)
            m._fill("nested_quant_map", state.state2.code)
            m._fill("nested_offset", state.offset.reshape(()))
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    def _fill(self, name: str, value: torch.Tensor) -> None:
        target = getattr(self, name)
        if value.shape != target.shape or value.dtype != target.dtype:
            raise RuntimeError(  # a bug: bitsandbytes' layout no longer matches the format
                f"bitsandbytes gave {name} {tuple(value.shape)} {value.dtype}, "
                f"the nf4 format expects {tuple(target.shape)} {target.dtype}"
            )
        target.copy_(value)

    # --- bitsandbytes' view of the state -------------------------------------------------------
    def quant_state(self):
        """A fresh `bitsandbytes.functional.QuantState` over this module's buffers (shared, not copied)."""
        F = _bnb().functional
        state2, offset = None, None
        if self.double_quant:
            state2 = F.QuantState(absmax=self.nested_absmax, code=self.nested_quant_map,
                                  blocksize=NESTED_BLOCK_SIZE, dtype=torch.float32)
            offset = self.nested_offset
        return F.QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                            code=self.quant_map, blocksize=self.block_size, quant_type=self.quant_type,
                            dtype=_DTYPES[self.weight_dtype], offset=offset, state2=state2)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [out, in]: bitsandbytes' dequantize_4bit, cast to `dtype`."""
        w = _bnb().functional.dequantize_4bit(self.weight_packed, self.quant_state())
        return w.to(dtype)

    def _derive_layouts(self, dtype: torch.dtype | None) -> None:
        """prepack: on CPU, the codes, levels and each block's fp32 absmax checked once for the C++
        kernels, where they read the layout (DerivedLayouts)."""
        self._fused = self._fused_layout()

    def _fused_layout(self) -> FusedNf4 | None:
        """The weight as the C++ kernels read it, where they can (CPU, built, blocks inside rows)."""
        fits = self.weight_packed.is_cpu and cpu_fused.available() and applies(self.in_features, self.block_size)
        if not fits:
            return None
        levels = _bnb().functional.get_4bit_type(self.quant_type, device="cpu")  # the table its dequantization reads
        return FusedNf4(self.weight_packed, levels, absmax_fp32(self.quant_state()), self.block_size,
                        self.out_features, self.in_features)

    def _cpu_kernels(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """x [..., K] @ W.T + bias through the C++ kernels where they serve this call (eager, CPU, no
        gradient recorded, prepacked), else None. The fused matmul multiplies by the fp32 weight:
        it serves fp32 activations of an fp32 weight only, where bitsandbytes rounds nothing;
        others take the dequantized weight rounded as bitsandbytes rounds it, and the bias added
        by the matmul as F.linear adds it, at every M: bitsandbytes' output exactly."""
        if (self.kernel != "auto" or not x.is_cpu or x.dtype not in cpu_fused.ACTIVATION_DTYPES
                or x.shape[-1] != self.in_features or x.numel() == 0 or not _direct(x)):
            return None
        # not prepacked: derived for this call, so that a call's result never depends on prepack
        fused = self._fused if self._prepack_dtype is not None else self._fused_layout()
        if fused is None:
            return None
        exact = x.dtype == torch.float32 and self.weight_dtype == "float32"
        if exact and x.numel() <= MAX_M * self.in_features:
            y = fused(x)
            return y if y is None or bias is None else y + bias
        y = fused.linear(x.reshape(-1, self.in_features), _DTYPES[self.weight_dtype], bias)
        return None if y is None else y.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)  # under autocast: its dtype, as nn.Linear
        if self.kernel not in self.KERNELS:
            raise ValueError(f"kernel must be one of {self.KERNELS}, got {self.kernel!r}")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        self._check_layouts()
        y = self._cpu_kernels(x, bias)
        if y is not None:
            return y
        if self.kernel == "auto" and x.is_cuda:
            return _bnb().matmul_4bit(x, self.weight_packed.t(), quant_state=self.quant_state(), bias=bias)
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)

    def to_bnb_linear4bit(self) -> nn.Module:
        """A `bitsandbytes.nn.Linear4bit` computing with this very quantization (e.g. as a QLoRA base layer).

        It shares the packed weight and the quant-state tensors (frozen, read-only) with this module
        and gets a fresh QuantState object and its own copy of the bias. Note that bitsandbytes, on
        a CPU with AVX512-BF16, repacks the weight at its first eval-mode forward and rounds the
        block scales to bfloat16 (its `support_avx512bf16_for_cpu` flag), so results can then differ
        slightly from this module's.
        """
        bnb = _bnb()
        lin = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=self.bias is not None,
                                compress_statistics=self.double_quant, quant_type=self.quant_type,
                                quant_storage=torch.uint8, device="meta")
        state = self.quant_state()
        lin.weight = bnb.nn.Params4bit(self.weight_packed, requires_grad=False, quant_state=state,
                                       blocksize=self.block_size, compress_statistics=self.double_quant,
                                       quant_type=self.quant_type, quant_storage=torch.uint8, module=lin,
                                       bnb_quantized=True)
        lin.quant_state = state
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return lin

    # --- CompressedModule ----------------------------------------------------------------------
    def format_spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "quant_type": self.quant_type,
            "block_size": self.block_size,
            "double_quant": self.double_quant,
            "bias": self.bias is not None,
            "weight_dtype": self.weight_dtype,
            "bias_dtype": self.bias_dtype,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: torch.device | str = "meta") -> NF4Linear:
        return cls(**spec, device=device)

    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def storage_bytes(self) -> int:
        """Packed codes + absmax + level map, and with double quant the nested scales, map and offset."""
        tensors = [self.weight_packed, self.absmax, self.quant_map]
        if self.double_quant:
            tensors += [self.nested_absmax, self.nested_quant_map, self.nested_offset]
        return sum(t.numel() * t.element_size() for t in tensors)

    def describe(self) -> str:
        return f"{self.quant_type} b{self.block_size}" + (" dq" if self.double_quant else "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.describe()}"
