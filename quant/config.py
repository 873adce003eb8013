"""Fields shared by every method that produces integer-quantized weights (RTN, GPTQ, ...)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from compress.errors import CompressError
from compress.interfaces import MethodConfig


class IntGridSettings(BaseModel):
    """The integer grid's fields (quantize.py), shared by the quantization methods and by
    SparseGPT's joint quantization."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(4, ge=2, le=8, description="Bits per weight, 2 to 8.")
    group_size: int = Field(
        128,
        description="Columns (input features) sharing one scale; -1 for one scale per output channel. "
        "A layer whose input size is not a multiple gets a shorter last group.",
    )
    symmetric: bool = Field(True, description="Symmetric grid around zero (no zero points) or asymmetric min/max.")
    clip: bool = Field(False, description="Shrink each group's range to the one with the least rounding error "
                       "(a few clipped outliers buy a finer step for every other weight); false: min/max.")
    scale_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Storage dtype of the scales."
    )

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v != -1 and v < 8:
            raise ValueError("must be -1 (per-channel) or at least 8")
        return v

    def torch_scale_dtype(self) -> torch.dtype:
        return getattr(torch, self.scale_dtype)

    def group_size_for(self, name: str, in_features: int, out_features: int) -> int:
        """The group size a layer gets: -1 means its whole input dimension; larger than it is refused."""
        if self.group_size == -1:
            return in_features
        if self.group_size > in_features:
            raise CompressError(
                f"group size {self.group_size} cannot apply to {name} (Linear {in_features} -> {out_features}): "
                f"it is larger than the input dimension {in_features}; use a group size <= {in_features}, "
                "-1 for per-channel, or ignore this layer"
            )
        return self.group_size


class IntWeightConfig(IntGridSettings, MethodConfig):
    """Base of the integer weight-only quantization configs: same grid, same QuantLinear format."""

    def check_module(self, name: str, module: nn.Module) -> None:
        self.group_size_for(name, module.in_features, module.out_features)
