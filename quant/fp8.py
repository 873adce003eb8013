"""FP8 (e4m3) weight-only quantization with per-output-channel scales (data-free)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from compress.interfaces import MethodConfig

from .layers import FP8Linear


class FP8Config(MethodConfig):
    """FP8 e4m3 weights with one scale per output channel (data-free)."""

    method: Literal["fp8"] = "fp8"
    scale_dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Storage dtype of the scales.")

    def build(self) -> FP8Compressor:
        return FP8Compressor(self)


class FP8Compressor:
    def __init__(self, config: FP8Config) -> None:
        self.config = config

    @torch.no_grad()
    def compress(self, name: str, module: nn.Linear) -> FP8Linear:
        return FP8Linear.from_weight(module.weight, module.bias, self.config.scale_dtype)
