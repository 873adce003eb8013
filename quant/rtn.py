"""Round-to-nearest (RTN) weight-only quantization: the data-free baseline.

Each targeted Linear's weight [out, in] is split into groups along `in`, given a grid (min/max,
or by default clipped to the least rounding error), and every weight is rounded to its nearest
grid point. No calibration data is needed.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .config import IntWeightConfig
from .layers import QuantLinear
from .quantize import cast_grid, compute_grid, quantize


class RTNConfig(IntWeightConfig):
    """Round-to-nearest weight quantization, 2-8 bits, per-channel or group-wise (data-free)."""

    method: Literal["rtn"] = "rtn"

    def build(self) -> RTNCompressor:
        return RTNCompressor(self)


class RTNCompressor:
    def __init__(self, config: RTNConfig) -> None:
        self.config = config

    @torch.no_grad()
    def compress(self, name: str, module: nn.Linear) -> QuantLinear:
        """RTN-quantize one Linear into a QuantLinear (the input module is not modified)."""
        c = self.config
        w = module.weight.detach()  # [out, in]
        gs = c.group_size_for(name, module.in_features, module.out_features)
        grid = cast_grid(compute_grid(w, c.bits, gs, c.symmetric, c.clip), c.torch_scale_dtype())
        return QuantLinear.from_codes(quantize(w, grid), grid, module.bias, c.scale_dtype)
