"""Rank allocation: budgets met within one rank step per layer, ranks follow the errors, and
budgets that cannot be met are refused."""

import pytest
import torch

from compress.errors import CompressError
from compress.lowrank import allocation as al
from compress.lowrank.allocation import Shape

SHAPES = {"a": Shape(64, 64), "b": Shape(96, 64), "c": Shape(32, 64), "d": Shape(64, 96)}


def within_one_step(plan, shapes, budget):
    kept = sum(shapes[n].cost(r) for n, r in plan.items())
    return budget - max(s.per_rank for s in shapes.values()) * len(shapes) <= kept <= budget


def test_break_even_and_useless_shapes():
    assert Shape(64, 64).break_even == 32 and Shape(64, 64).cost(32) == Shape(64, 64).dense
    assert al.useless(Shape(1, 4096)) and al.useless(Shape(2, 2)) and not al.useless(Shape(2, 4096))


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.9])
def test_uniform_meets_the_budget_with_the_same_fraction_everywhere(keep):
    budget = al.budget_for(keep, "targets", SHAPES, 0)
    plan = al.uniform(budget, SHAPES)
    assert within_one_step(plan, SHAPES, budget)
    fractions = [SHAPES[n].cost(r) / SHAPES[n].dense for n, r in plan.items()]
    assert max(fractions) - min(fractions) < 0.05


def linear_errors(weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Error curves falling linearly from `weight` at rank 0 to 0 at full rank."""
    return {n: torch.linspace(weights[n], 0, min(SHAPES[n].out_features, SHAPES[n].in_features) + 1)
            for n in SHAPES}


@pytest.mark.parametrize("keep", [0.3, 0.6])
def test_by_error_meets_the_budget_and_no_rank_step_is_worth_moving(keep):
    budget = al.budget_for(keep, "targets", SHAPES, 0)
    errors = {n: torch.tensor([0.5 ** (r / d) for r in range(65)]) for n, d in zip(SHAPES, (2, 4, 8, 16))}
    errors["b"] = torch.tensor([1 - r / 64 for r in range(65)])  # a flat spectrum
    plan = al.by_error(budget, SHAPES, errors)
    assert within_one_step(plan, SHAPES, budget)
    assert len(set(plan.values())) > 2  # the curves differ, so do the ranks

    def gain(n, rank):  # error removed per parameter by rank step rank -> rank + 1
        return float(errors[n][rank] - errors[n][rank + 1]) / SHAPES[n].per_rank

    for p in plan:
        for q in plan:
            if p != q and plan[p] is not None and plan[q] is not None and plan[q] > 1:
                # growing p by one step gains no more than q's last step gave
                assert gain(p, plan[p]) <= gain(q, plan[q] - 1) * (1 + 1e-9)


def test_by_error_turns_a_layer_dense_at_its_break_even_rank():
    errors = linear_errors({"a": 100.0, "b": 0.01, "c": 0.01, "d": 0.01})
    budget = SHAPES["a"].dense + sum(s.per_rank for n, s in SHAPES.items() if n != "a")
    plan = al.by_error(budget, SHAPES, errors)
    assert plan == {"a": None, "b": 1, "c": 1, "d": 1}


def test_model_scope_counts_untargeted_parameters_in_full():
    targeted = sum(s.dense for s in SHAPES.values())  # 22528
    budget = al.budget_for(0.8, "model", SHAPES, 2 * targeted)
    assert budget == int(0.8 * 2 * targeted) - targeted


def test_budgets_that_cannot_be_met_are_refused():
    targeted = sum(s.dense for s in SHAPES.values())
    with pytest.raises(CompressError, match="untargeted parameters alone are 90.0%"):
        al.budget_for(0.5, "model", SHAPES, 10 * targeted)
    with pytest.raises(CompressError, match="below rank 1"):
        al.by_error(100, SHAPES, linear_errors(dict.fromkeys(SHAPES, 1.0)))
