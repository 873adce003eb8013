"""Activation-aware SVD (Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition
for Compressing Large Language Models"): scale input channel j by mean |x_j|^alpha before the
SVD, so that channels carrying large activations are reproduced more faithfully, and fold the
scaling back into the down factor."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from compress.errors import CompressError
from compress.quant.hessians import SharedHessians

from .config import LowRankCompressor, LowRankConfig
from .svd_math import Factorization, activation_aware_svd


class ASVDConfig(LowRankConfig):
    """SVD of the weight scaled by calibration activation magnitudes (ASVD)."""

    method: Literal["asvd"] = "asvd"
    alpha: float = Field(0.5, gt=0, le=1, description="Exponent of the mean absolute activation used as each "
                         "input channel's scale (0.5 in the ASVD paper).")
    needs_calibration: ClassVar[bool] = True

    def build(self) -> ASVDCompressor:
        return ASVDCompressor(self)


class ASVDCompressor(LowRankCompressor):
    def __init__(self, config: ASVDConfig) -> None:
        super().__init__(config)
        self.abs_sums: dict[str, tuple[torch.Tensor, int]] = {}  # module -> (Σ_tokens |x_j| [in] fp32, tokens)
        self.grams = SharedHessians(config.method)

    def observe(self, name: str, module: nn.Linear, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()  # [tokens, in]
        total, count = self.abs_sums.get(name, (None, 0))
        sums = rows.abs().sum(dim=0)
        self.abs_sums[name] = (sums if total is None else total.add_(sums), count + rows.shape[0])
        if self.wants_gram():
            self.grams.observe(name, x)

    def factorize(self, name: str, module: nn.Linear) -> tuple[Factorization, torch.Tensor | None]:
        if name not in self.abs_sums:
            raise CompressError(f"asvd: {name} saw no calibration inputs (is it used in the forward pass?)")
        sums, count = self.abs_sums.pop(name)
        f = activation_aware_svd(module.weight, sums / count, self.config.alpha)
        return f, self.grams.take(name) if self.wants_gram() else None
