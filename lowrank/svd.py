"""Plain truncated SVD of each targeted weight: the data-free baseline (calibration data only
in the survey of `allocation: sensitivity`)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from compress.quant.hessians import SharedHessians

from .config import LowRankCompressor, LowRankConfig
from .svd_math import Factorization, plain_svd


class SVDConfig(LowRankConfig):
    """Truncated SVD of each weight (the baseline: it minimises the weight error, not the output's)."""

    method: Literal["svd"] = "svd"

    def build(self) -> SVDCompressor:
        return SVDCompressor(self)


class SVDCompressor(LowRankCompressor):
    def __init__(self, config: SVDConfig) -> None:
        super().__init__(config)
        self.grams = SharedHessians(config.method)

    def observe(self, name: str, module: nn.Linear, x: torch.Tensor) -> None:
        if self.wants_gram():
            self.grams.observe(name, x)

    def factorize(self, name: str, module: nn.Linear) -> tuple[Factorization, torch.Tensor | None]:
        return plain_svd(module.weight), self.grams.take(name) if self.wants_gram() else None
