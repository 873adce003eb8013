"""Rank allocation: which rank each layer gets so that the kept parameters meet a budget.

A layer [out, in] at rank r stores r·(out + in) parameters; from the break-even rank
ceil(out·in / (out + in)) on, its factors would not be smaller than the dense weight, so it
stays dense (out·in parameters, no error). Every factored layer keeps at least rank 1.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from compress.errors import CompressError


@dataclass(frozen=True)
class Shape:
    out_features: int
    in_features: int

    @property
    def dense(self) -> int:
        return self.out_features * self.in_features

    @property
    def per_rank(self) -> int:
        return self.out_features + self.in_features

    @property
    def break_even(self) -> int:
        """The smallest rank whose factors are not smaller than the dense weight."""
        return -(-self.dense // self.per_rank)

    def cost(self, rank: int | None) -> int:
        """Parameters kept at `rank` (None: dense)."""
        return self.dense if rank is None else rank * self.per_rank


def useless(shape: Shape) -> bool:
    """Even rank 1 would not be smaller than the dense weight (e.g. a layer with 1 or 2 outputs)."""
    return shape.break_even <= 1


def budget_for(keep: float, scope: str, shapes: dict[str, Shape], model_params: int) -> int:
    """Parameters the targeted layers may keep: `keep` of their own (scope 'targets') or `keep` of
    the model's, the untargeted parameters counting in full (scope 'model')."""
    targeted = sum(s.dense for s in shapes.values())
    if scope == "targets":
        return int(keep * targeted)
    budget = int(keep * model_params) - (model_params - targeted)
    if budget < sum(s.per_rank for s in shapes.values()):
        raise CompressError(
            f"keep {keep} of the model's {model_params:,} parameters cannot be met: the untargeted parameters alone "
            f"are {(model_params - targeted) / model_params:.1%} of the model (with rank 1 for every targeted "
            "layer); raise keep, target more layers, or use scope: targets"
        )
    return budget


def uniform(budget: int, shapes: dict[str, Shape]) -> dict[str, int | None]:
    """The same fraction of every layer's parameters: rank = floor(f · out·in / (out + in)),
    f = budget / targeted parameters, at least 1."""
    fraction = budget / sum(s.dense for s in shapes.values())
    plan = {}
    for name, s in shapes.items():
        rank = max(1, int(fraction * s.dense / s.per_rank))
        plan[name] = None if rank >= s.break_even else rank
    return plan


def by_error(budget: int, shapes: dict[str, Shape], errors: dict[str, torch.Tensor]) -> dict[str, int | None]:
    """Ranks that greedily minimise Σ errors[name][rank] within the budget.

    errors[name]: [k + 1] predicted error of keeping rank 0..k (non-increasing, 0 at full rank).
    Starting from rank 1 everywhere, repeatedly grow the layer whose next rank removes the most
    error per parameter added; reaching its break-even rank makes a layer dense (error 0, cost
    out·in, no more than the factors would cost). A layer whose next step does not fit grows no
    further, so the budget is met within one rank step per layer.
    """
    plan: dict[str, int | None] = {n: 1 for n in shapes}
    spent = sum(s.per_rank for s in shapes.values())
    if spent > budget:
        raise CompressError(f"a budget of {budget:,} parameters is below rank 1 for every targeted layer "
                            f"({spent:,}); raise keep")
    curves = {n: errors[n].double().cpu().tolist() for n in shapes}

    def step(name: str, rank: int) -> tuple[float, int]:
        """(error removed, parameters added) by growing `name` from `rank` to rank + 1 (or dense)."""
        s, curve = shapes[name], curves[name]
        if rank + 1 >= s.break_even:
            return curve[rank], s.dense - s.cost(rank)
        return curve[rank] - curve[rank + 1], s.per_rank

    heap = []
    for name in shapes:
        gain, cost = step(name, 1)
        heapq.heappush(heap, (-gain / cost, name, 1, cost))
    while heap:
        _, name, rank, cost = heapq.heappop(heap)
        if spent + cost > budget:
            continue
        spent += cost
        if rank + 1 >= shapes[name].break_even:
            plan[name] = None
            continue
        plan[name] = rank + 1
        gain, cost = step(name, rank + 1)
        heapq.heappush(heap, (-gain / cost, name, rank + 1, cost))
    return plan
