"""GPTQ: calibrated weight quantization with Hessian-based error compensation.

The engine feeds each targeted Linear's inputs to `observe` (accumulating H = 2/N X^T X per
module), then asks `compress` for the quantized module: GPTQ's column-by-column rounding with
Optimal Brain Surgeon updates (gptq_math.py), stored in the same QuantLinear format as RTN.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from .config import IntWeightConfig
from .gptq_math import gptq_quantize
from .hessians import SharedHessians
from .layers import QuantLinear


class GPTQConfig(IntWeightConfig):
    """GPTQ weight quantization, 2-8 bits, Hessian-corrected from calibration data."""

    method: Literal["gptq"] = "gptq"
    damp: float = Field(0.01, gt=0, le=1, description="Dampening added to the Hessian diagonal, as a fraction "
                        "of its mean (raised automatically, with a warning, if the Hessian is not positive definite).")
    block_size: int = Field(128, ge=1, description="Columns per lazy batch update (speed only).")
    actorder: bool = Field(True, description="Quantize columns in order of decreasing activation energy "
                           "(groups stay contiguous, so the format is unchanged).")
    clip: bool = Field(True, description="Shrink each group's range to the one with the least rounding error "
                       "weighted by each column's input energy (diag H); false: min/max.")
    static_groups: bool = Field(False, description="Compute every group's grid from the original weights up "
                                "front, instead of from the error-compensated weights as each group starts.")

    needs_calibration: ClassVar[bool] = True

    def build(self) -> GPTQCompressor:
        return GPTQCompressor(self)


class GPTQCompressor:
    def __init__(self, config: GPTQConfig) -> None:
        self.config = config
        self.hessians = SharedHessians("gptq")

    def observe(self, name: str, module: nn.Linear, x: torch.Tensor) -> None:
        """x: the module's input [..., in] for one batch of calibration samples."""
        self.hessians.observe(name, x)

    @torch.no_grad()
    def compress(self, name: str, module: nn.Linear) -> QuantLinear:
        c = self.config
        h = self.hessians.take(name)
        gs = c.group_size_for(name, module.in_features, module.out_features)
        result = gptq_quantize(module.weight, h, c.bits, gs, c.symmetric, c.torch_scale_dtype(), c.damp,
                               c.block_size, c.actorder, c.static_groups, c.clip)
        return QuantLinear.from_codes(result.codes, result.grid, module.bias, c.scale_dtype)
