"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"):
score |w_ij| * ||x_j||_2, the weight's magnitude times the norm of its input feature over the
calibration tokens, compared within each output row (unstructured) or within each group of M
(N:M). No weight update."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from compress.errors import CompressError

from .config import PruneConfig
from .layers import SparseLinear
from .magnitude import prune_by_scores
from .owl import OutlierAllocation, add_square_sums


class WandaConfig(PruneConfig):
    """Wanda pruning (|weight| x input norm), unstructured or N:M, from calibration data."""

    method: Literal["wanda"] = "wanda"
    needs_calibration: ClassVar[bool] = True

    def build(self) -> WandaCompressor:
        return WandaCompressor(self)


class WandaCompressor(OutlierAllocation):
    def __init__(self, config: WandaConfig) -> None:
        super().__init__(config)
        self.square_sums: dict[str, torch.Tensor] = {}  # module -> sum over tokens of x_j^2, [in] fp32

    def observe(self, name: str, module: nn.Linear, x: torch.Tensor) -> None:
        if self.surveying:
            return self.survey_observe(name, x)
        add_square_sums(self.square_sums, name, x)

    @torch.no_grad()
    def compress(self, name: str, module: nn.Linear) -> SparseLinear:
        if name not in self.square_sums:
            raise CompressError(f"wanda: {name} saw no calibration inputs (is it used in the forward pass?)")
        norms = self.square_sums.pop(name).sqrt().to(module.weight.device)  # [in]
        w = module.weight.detach()
        return prune_by_scores(name, module, w, w.float().abs() * norms, self.config, per_row=True,
                               ratio=self.ratio(name))
