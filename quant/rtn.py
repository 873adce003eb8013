"""Round-to-nearest (RTN) weight-only quantization: the data-free baseline.

Each targeted Linear's weight [out, in] is split into groups along `in`, given a min/max grid,
and every weight is rounded to its nearest grid point. No calibration data is needed.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from compress.errors import CompressError
from compress.interfaces import MethodConfig

from .layers import QuantLinear
from .quantize import cast_grid, compute_grid, quantize


class RTNConfig(MethodConfig):
    """Round-to-nearest weight quantization, 2-8 bits, per-channel or group-wise (data-free)."""

    method: Literal["rtn"] = "rtn"
    bits: int = Field(4, ge=2, le=8, description="Bits per weight, 2 to 8.")
    group_size: int = Field(
        128,
        description="Columns (input features) sharing one scale; -1 for one scale per output channel. "
        "A layer whose input size is not a multiple gets a shorter last group.",
    )
    symmetric: bool = Field(True, description="Symmetric grid around zero (no zero points) or asymmetric min/max.")
    scale_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Storage dtype of the scales."
    )

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v != -1 and v < 8:
            raise ValueError("must be -1 (per-channel) or at least 8")
        return v

    def build(self) -> RTNCompressor:
        return RTNCompressor(self)


class RTNCompressor:
    def __init__(self, config: RTNConfig) -> None:
        self.config = config

    def compress(self, name: str, module: nn.Module) -> QuantLinear:
        return quantize_linear(name, module, self.config.bits, self.config.group_size, self.config.symmetric,
                               self.config.scale_dtype)


def resolve_group_size(name: str, in_features: int, out_features: int, group_size: int) -> int:
    """The group size a layer gets: -1 means its whole input dimension; larger than it is refused."""
    if group_size == -1:
        return in_features
    if group_size > in_features:
        raise CompressError(
            f"group size {group_size} cannot apply to {name} (Linear {in_features} -> {out_features}): "
            f"it is larger than the input dimension {in_features}; use a group size <= {in_features}, "
            "-1 for per-channel, or ignore this layer"
        )
    return group_size


@torch.no_grad()
def quantize_linear(
    name: str, linear: nn.Linear, bits: int, group_size: int, symmetric: bool, scale_dtype: str
) -> QuantLinear:
    """RTN-quantize one Linear into a QuantLinear (the input module is not modified)."""
    w = linear.weight.detach()  # [out, in]
    gs = resolve_group_size(name, linear.in_features, linear.out_features, group_size)
    grid = cast_grid(compute_grid(w, bits, gs, symmetric), getattr(torch, scale_dtype))
    codes = quantize(w, grid)
    return QuantLinear.from_codes(codes, grid, linear.bias, scale_dtype)
