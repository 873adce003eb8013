"""Fields and plumbing shared by the low-rank methods (svd, asvd, svd_llm).

A low-rank step runs in three phases, driven by the runner:
1. survey (energy or sensitivity allocation only): a pass over the uncompressed model in which
   every targeted layer is factorized once and its error at every rank predicted from its
   spectrum (svd_math.py); for `sensitivity`, the engine also measures how much one truncation
   of the layer (at the uniform rank) changes its decoder layer's output, which scales the
   prediction into the decoder layer's terms;
2. allocate: ranks for all layers against the parameter budget (allocation.py), before any
   layer is compressed; layers the allocation keeps whole stay dense;
3. compress: layer by layer, each layer factorized again from the statistics of the inputs the
   already-compressed model gives it, and truncated at its allotted rank.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.errors import CompressError
from compress.interfaces import MethodConfig

from . import allocation
from .allocation import Shape
from .layers import LowRankLinear
from .svd_math import Factorization

log = logging.getLogger(__name__)


class LowRankConfig(MethodConfig):
    """Base of the low-rank configs: a parameter budget (or a fixed rank) and its allocation."""

    keep: float = Field(0.8, gt=0, lt=1, description="Fraction of parameters to keep: of the targeted layers "
                        "(scope: targets) or of the whole model (scope: model).")
    scope: Literal["targets", "model"] = Field("targets", description="What `keep` is a fraction of.")
    allocation: Literal["uniform", "energy", "sensitivity"] = Field(
        "uniform", description="How ranks are spread: the same fraction of every layer; by the spectrum's "
        "discarded energy (of the matrix the method decomposes); or by the measured effect of each layer's "
        "truncation on its decoder layer's output (calibration data, a survey pass before compressing).")
    rank: int | None = Field(None, ge=1, description="A fixed rank for every targeted layer instead of a budget "
                             "(then keep, scope and allocation do not apply).")

    plans: ClassVar[bool] = True

    @model_validator(mode="after")
    def _rank_or_budget(self) -> LowRankConfig:
        budget = {"keep", "scope", "allocation"} & self.model_fields_set
        if self.rank is not None and budget:
            raise ValueError(f"rank fixes every layer's rank; {', '.join(sorted(budget))} would not apply "
                             "(give either rank or a budget)")
        return self

    def projected(self, module: nn.Module, plan: Any = None) -> LowRankLinear:
        """Later steps may compress the factors (`down`, `up`), at the planned rank once known."""
        return LowRankLinear(module.in_features, module.out_features, plan or 1, module.bias is not None,
                             device="meta")

    def check_module(self, name: str, module: nn.Module) -> None:
        limit = min(module.in_features, module.out_features)
        if self.rank is not None and self.rank > limit:
            raise CompressError(f"rank {self.rank} is above min(in, out) = {limit} of {name} (Linear "
                                f"{module.in_features} -> {module.out_features}); lower rank or ignore this layer")


class LowRankCompressor:
    """What the three methods share (a PlanningCompressor); each subclass defines observe() (if
    it uses calibration data) and factorize(name, module) -> (Factorization, Gram matrix or None)."""

    def __init__(self, config: LowRankConfig) -> None:
        self.config = config
        self.plan: dict[str, int | None] | None = None  # module -> rank (None: stays dense)
        self.shapes: dict[str, Shape] = {}  # the modules that can be factored
        self.budget = 0  # parameters those modules may keep
        self.curves: dict[str, torch.Tensor] = {}  # survey: module -> predicted error of rank 0..k, [k + 1]
        self.probed: dict[str, int] = {}  # survey (sensitivity): module -> rank of the measured truncation

    @property
    def needs_survey(self) -> bool:
        return self.config.rank is None and self.config.allocation != "uniform"

    @property
    def survey_calibrated(self) -> bool:
        return self.config.calibrated or self.config.allocation == "sensitivity"

    def wants_gram(self) -> bool:
        """Whether observe() must accumulate the calibration Gram matrix now: sensitivity's survey
        predicts output errors with it (whitening needs it always)."""
        return self.plan is None and self.needs_survey and self.config.allocation == "sensitivity"

    def factorize(self, name: str, module: nn.Linear) -> tuple[Factorization, torch.Tensor | None]:
        raise NotImplementedError

    # --- before any long work ------------------------------------------------------------------
    def check_plan(self, modules: dict[str, nn.Module], model_params: int) -> None:
        c = self.config
        for name, m in modules.items():
            s = Shape(m.out_features, m.in_features)
            if allocation.useless(s):
                log.warning("%s: %s (Linear %d -> %d) is too small for any rank to save parameters; it stays "
                            "dense", c.method, name, s.in_features, s.out_features)
            else:
                self.shapes[name] = s
        if not self.shapes:
            raise CompressError(f"{c.method}: no targeted layer is large enough for a rank that saves parameters")
        if c.rank is None:  # layers too small to factor count as untargeted
            self.budget = allocation.budget_for(c.keep, c.scope, self.shapes, model_params)
            floor = sum(s.per_rank for s in self.shapes.values())
            if self.budget < floor:
                raise CompressError(f"{c.method}: keep {c.keep} leaves {self.budget:,} parameters for the targeted "
                                    f"layers, below rank 1 for every one of them ({floor:,}); raise keep")

    # --- phase 1: survey -----------------------------------------------------------------------
    def survey(self, name: str, module: nn.Linear) -> nn.Module | None:
        """Record the layer's predicted error curve; for sensitivity, return a copy truncated at
        the rank uniform allocation would give it, whose effect the engine measures."""
        f, gram = self.factorize(name, module)
        if self.config.allocation == "energy":
            self.curves[name] = f.energy_tail()
            return None
        curve = self.curves[name] = f.output_error_tail(gram)
        s = self.shapes[name]
        fraction = self.budget / sum(t.dense for t in self.shapes.values())
        # the probe's predicted error must be > 0 to scale the curve: not past the matrix's rank
        rank = min(max(1, int(fraction * s.dense / s.per_rank)), int((curve > 0).sum()) - 1)
        if rank < 1:  # the layer's output is zero on the calibration data: nothing to measure
            return None
        self.probed[name] = rank
        up, down = f.factors(rank)
        return LowRankLinear.from_factors(up, down, module.bias, module.weight.dtype)

    def measured(self, name: str, layer_error: float) -> None:
        """The relative change ||Δout||² / ||out||² of the decoder layer's output with `name`
        truncated at its probed rank: the layer's curve, rescaled to match it there."""
        self.curves[name] = self.curves[name] * (layer_error / float(self.curves[name][self.probed[name]]))

    # --- phase 2: allocate ---------------------------------------------------------------------
    def allocate(self, modules: dict[str, nn.Module], model_params: int) -> dict[str, int | None]:
        """Ranks for every targeted module (None: stays dense), against the budget."""
        c = self.config
        plan: dict[str, int | None] = dict.fromkeys(modules)  # too small to factor: dense
        if c.rank is not None:
            for name, s in self.shapes.items():
                if c.rank >= s.break_even:
                    log.warning("%s: rank %d keeps %s's factors no smaller than its weight; it stays dense",
                                c.method, c.rank, name)
                plan[name] = None if c.rank >= s.break_even else c.rank
        elif c.allocation == "uniform":
            plan.update(allocation.uniform(self.budget, self.shapes))
        else:
            missing = [n for n in self.shapes if n not in self.curves]
            if missing:
                raise RuntimeError(f"{c.method}: {missing[0]} was not surveyed before allocation")
            plan.update(allocation.by_error(self.budget, self.shapes, self.curves))
        self.curves.clear()
        self.plan = plan
        return plan

    def use_plan(self, plan: dict[str, int | None]) -> None:
        """Adopt the ranks just allocated, or those an interrupted run recorded."""
        self.plan = plan

    # --- phase 3: compress ---------------------------------------------------------------------
    @torch.no_grad()
    def compress(self, name: str, module: nn.Linear) -> LowRankLinear:
        rank = self.plan[name]
        f, _ = self.factorize(name, module)
        up, down = f.factors(rank)
        return LowRankLinear.from_factors(up, down, module.bias, module.weight.dtype)

