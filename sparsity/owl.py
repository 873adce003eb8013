"""Outlier-weighted layerwise sparsity (OWL; Yin et al. 2023, "Outlier Weighed Layerwise Sparsity"):
per-decoder-layer pruning ratios that keep the requested mean, lower where a layer holds more
outlier weights.

A survey pass over the uncompressed model (compress/planning.py) scores every weight as Wanda
does, |w_ij| * ||x_j||, and counts per decoder layer the fraction D_l of scores above `m` times
the layer's mean score. The ratios are target - (D'_l - mean D'), with D' the outlier fractions
rescaled to [0, 2 * lambda] (so they span 2 * lambda, not always centred on the target); a final
shift makes the parameter-weighted mean exactly the target (the layers of one model may differ
in size). Every Linear of a decoder layer gets its layer's
ratio; the plan is recorded, so `--resume` keeps it.

Wanda and SparseGPT compressors inherit `OutlierAllocation`; with allocation 'uniform' it plans
nothing and every module gets the configured ratio.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError

from .config import PruneConfig

_LAYER = re.compile(r"^(.*\.\d+)\.")  # the deepest "<name>.<index>." prefix: the decoder layer


def add_square_sums(sums: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> None:
    """sums[name] += the sum over tokens of x_j^2 (x [..., in]; fp32 [in]): Wanda's input norms."""
    rows = x.detach().reshape(-1, x.shape[-1]).float()  # [tokens, in]
    total = sums.get(name)
    squares = rows.square().sum(dim=0)
    sums[name] = squares if total is None else total.add_(squares)


def layer_of(name: str) -> str:
    match = _LAYER.match(name)
    return match.group(1) if match else name


class OutlierAllocation:
    """The planning half of a calibrated pruning compressor (the PlanningCompressor protocol)."""

    def __init__(self, config: PruneConfig) -> None:
        self.config = config
        self.plan: dict[str, float] | None = None
        self._square_sums: dict[str, torch.Tensor] = {}  # survey: module -> sum over tokens of x_j^2 [in]
        self._layer: str | None = None  # the decoder layer whose scores are being gathered
        self._scores: list[torch.Tensor] = []  # its modules' flattened scores (one layer at a time)
        self._modules: dict[str, list[str]] = {}  # decoder layer -> its surveyed modules
        self.outlier_fraction: dict[str, float] = {}  # decoder layer -> D_l

    @property
    def needs_survey(self) -> bool:
        return self.config.allocation == "owl"

    survey_calibrated = needs_survey

    @property
    def surveying(self) -> bool:
        """True while observe() feeds the survey (before a plan exists), not the compression."""
        return self.needs_survey and self.plan is None

    def survey_observe(self, name: str, x: torch.Tensor) -> None:
        add_square_sums(self._square_sums, name, x)

    def check_plan(self, modules: dict[str, nn.Module], model_params: int) -> None:
        """Nothing to refuse from shapes alone: the config already refused N:M patterns."""

    @torch.no_grad()
    def survey(self, name: str, module: nn.Linear) -> None:
        if name not in self._square_sums:
            raise CompressError(f"{self.config.method}: {name} saw no calibration inputs in the survey "
                                "(is it used in the forward pass?)")
        layer = layer_of(name)
        if layer != self._layer:
            self._close_layer()
            self._layer = layer
        norms = self._square_sums.pop(name).sqrt().to(module.weight.device)
        self._scores.append((module.weight.detach().float().abs() * norms).flatten().cpu())
        self._modules.setdefault(layer, []).append(name)

    def _close_layer(self) -> None:
        if self._layer is not None and self._scores:
            scores = torch.cat(self._scores)
            threshold = self.config.owl_m * scores.mean()
            self.outlier_fraction[self._layer] = (scores > threshold).float().mean().item()
        self._scores = []

    def measured(self, name: str, layer_error: float) -> None:
        """Never called: the survey returns no stand-ins."""

    def allocate(self, modules: dict[str, nn.Module], model_params: int) -> dict[str, Any]:
        self._close_layer()
        target, spread = self.config.ratio(), self.config.owl_lambda
        layers = list(self._modules)
        d = torch.tensor([self.outlier_fraction[layer] for layer in layers], dtype=torch.float64)
        span = (d.max() - d.min()).item()
        scaled = (d - d.min()) / span * 2 * spread if span > 0 else torch.zeros_like(d)
        ratios = target - (scaled - scaled.mean())  # more outliers: fewer weights pruned
        sizes = torch.tensor([sum(modules[n].weight.numel() for n in self._modules[layer]) for layer in layers],
                             dtype=torch.float64)
        ratios += target - (ratios * sizes).sum() / sizes.sum()  # the parameter-weighted mean is the target
        if ratios.min() < 0 or ratios.max() >= 1:
            raise CompressError(f"owl: lambda {spread} around a mean ratio of {target} gives layer ratios from "
                                f"{ratios.min():.3f} to {ratios.max():.3f}, outside [0, 1); use a smaller owl_lambda")
        plan = {name: float(r) for layer, r in zip(layers, ratios.tolist()) for name in self._modules[layer]}
        return {name: plan.get(name) for name in modules}

    def use_plan(self, plan: dict[str, Any]) -> None:
        self.plan = plan

    def ratio(self, name: str) -> float:
        """The fraction of `name`'s weights to prune: its layer's planned ratio, or the configured one."""
        return self.plan[name] if self.plan is not None else self.config.ratio()
