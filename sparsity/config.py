"""Fields shared by every pruning method (magnitude, Wanda, SparseGPT)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from torch import nn

from compress.errors import CompressError
from compress.interfaces import MethodConfig

from .masks import UNSTRUCTURED, parse_pattern


class PruneConfig(MethodConfig):
    """Base of the weight pruning configs: one sparsity pattern, the SparseLinear format."""

    sparsity: float = Field(0.5, ge=0, lt=1, description="Fraction of each targeted layer's weights to prune "
                            "(unstructured); for N:M it must be N/M or left at its default.")
    pattern: str = Field(UNSTRUCTURED, description="'unstructured', or 'N:M': N of every M consecutive input "
                         "weights pruned (2:4 and 4:8 keep half; 2:4 is what sparse tensor cores run).")
    allocation: Literal["uniform", "owl"] = Field(
        "uniform", description="Per-layer ratios: uniform (every layer the same), or owl (outlier-weighted: "
        "decoder layers with more outlier weights pruned less, the mean kept; unstructured, calibrated methods).")
    owl_m: float = Field(5.0, gt=1, description="owl: a weight is an outlier when its Wanda score exceeds this "
                         "multiple of its decoder layer's mean score.")
    owl_lambda: float = Field(0.08, gt=0, lt=0.5, description="owl: the layer ratios span 2 * lambda, their "
                              "mean the target.")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        parse_pattern(v)
        return v

    @model_validator(mode="after")
    def _ratio_matches_pattern(self) -> PruneConfig:
        nm = parse_pattern(self.pattern)
        if nm is not None and "sparsity" in self.model_fields_set and self.sparsity != nm[0] / nm[1]:
            raise ValueError(f"pattern {self.pattern} prunes {nm[0] / nm[1]:.2%}; sparsity {self.sparsity} "
                             "contradicts it (leave sparsity out)")
        return self

    @model_validator(mode="after")
    def _owl_applies(self) -> PruneConfig:
        if self.allocation == "owl" and parse_pattern(self.pattern) is not None:
            raise ValueError(f"allocation owl sets unstructured per-layer ratios; pattern {self.pattern} fixes every "
                             "group's count (use pattern unstructured)")
        if self.allocation == "owl" and not type(self).needs_calibration:
            raise ValueError(f"allocation owl scores weights by calibration activations; {self.method} uses none "
                             "(use wanda or sparsegpt)")
        return self

    @property
    def plans(self) -> bool:  # owl decides every layer's ratio before compressing any (compress/planning.py)
        return self.allocation == "owl"

    def ratio(self) -> float:
        nm = parse_pattern(self.pattern)
        return self.sparsity if nm is None else nm[0] / nm[1]

    def check_module(self, name: str, module: nn.Module) -> None:
        nm = parse_pattern(self.pattern)
        if nm is not None and module.in_features % nm[1]:
            raise CompressError(f"pattern {self.pattern} cannot apply to {name} (Linear {module.in_features} -> "
                                f"{module.out_features}): its input dimension is not a multiple of {nm[1]}; "
                                "ignore this layer or use unstructured sparsity")
