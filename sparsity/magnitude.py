"""Magnitude pruning: the data-free baseline. Unstructured: the weights of smallest |w| of each
layer (compared across the whole layer); N:M: the n smallest |w| of every m."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .config import PruneConfig
from .layers import SparseLinear
from .masks import nm_mask, parse_pattern, unstructured_mask


class MagnitudeConfig(PruneConfig):
    """Magnitude pruning, unstructured or N:M (data-free)."""

    method: Literal["magnitude"] = "magnitude"

    def build(self) -> MagnitudeCompressor:
        return MagnitudeCompressor(self)


def prune_by_scores(name: str, module: nn.Linear, weight: torch.Tensor, scores: torch.Tensor, config: PruneConfig,
                    per_row: bool, ratio: float | None = None) -> SparseLinear:
    """Prune `weight` [out, in] (the layer's, possibly updated) by `scores` (larger = keep), at
    `ratio` (unstructured; None: the config's)."""
    nm = parse_pattern(config.pattern)
    ratio = config.ratio() if ratio is None else ratio
    keep = unstructured_mask(scores, ratio, per_row) if nm is None else nm_mask(scores, *nm)
    return SparseLinear.from_pruned(weight, keep, config.pattern, ratio, module.bias, name)


class MagnitudeCompressor:
    def __init__(self, config: MagnitudeConfig) -> None:
        self.config = config

    @torch.no_grad()
    def compress(self, name: str, module: nn.Linear) -> SparseLinear:
        w = module.weight.detach()
        return prune_by_scores(name, module, w, w.float().abs(), self.config, per_row=False)
