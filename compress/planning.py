"""Planning steps: steps that decide something across all their modules before compressing any
(a low-rank step allocates ranks against a parameter budget).

For each planning step (`config.plans`), before the first layer is compressed:
1. `check_plan(modules, model parameters)`: what shapes alone can refuse (an infeasible budget),
   before any long work;
2. a survey pass over the *uncompressed* layers if the compressor asks (`needs_survey`), with
   calibration inputs if `survey_calibrated`: the engine's `survey_layers`;
3. `allocate(modules, model parameters)` -> plan {module name: entry, None = left alone}; the
   runner records it with the run's progress so `--resume` keeps it (`use_plan`).
Then modules the plan leaves alone leave the step (a later step that targeted their insides
gets the whole module), and later steps' modules inside the planned outputs are checked at
their planned shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .activations import Activations
from .calibration import LayerIO, LayerStep, survey_layers
from .errors import CompressError
from .progress import Progress

log = logging.getLogger(__name__)


def plan_steps(model: nn.Module, find: Callable[[], list[tuple[str, nn.Module]]], steps: list[LayerStep],
               io: LayerIO, device: torch.device, capture: Callable[[], Activations], progress: Progress,
               batch_size: int) -> dict[str, Any]:
    """{step index (str): plan} of every planning step. `find()` gives the decoder layers and
    `capture()` the first layer's calibration inputs, both only when a survey needs them."""
    planning = [s for s in steps if s.config.plans]
    model_params = sum(p.numel() for p in model.parameters())
    modules = {s.index: {n: model.get_submodule(n) for n in s.names} for s in planning}
    for step in planning:
        step.compressor.check_plan(modules[step.index], model_params)
    surveying = [s for s in planning if s.compressor.needs_survey]
    if surveying:
        layers = find()
        prefixes = tuple(n + "." for n, _ in layers)
        for step in surveying:
            outside = [n for n in step.names if not n.startswith(prefixes)]
            if outside and step.compressor.survey_calibrated:
                raise CompressError(f"steps[{step.index}] ({step.config.method}): {outside[0]} is outside the decoder "
                                    "layers, where calibration inputs are seen; ignore it or choose a data-free "
                                    "allocation")
        calibrated = any(s.compressor.survey_calibrated for s in surveying)
        survey_layers(model, layers, surveying, io, device, capture() if calibrated else None, progress, batch_size)
        for step in surveying:  # data-free surveys may look at modules outside the layers too (the head)
            for name in step.names:
                if not name.startswith(prefixes):
                    step.compressor.survey(name, model.get_submodule(name))
    return {str(s.index): s.compressor.allocate(modules[s.index], model_params) for s in planning}


def surveying_seconds(steps: list[LayerStep], spent: float) -> dict[int, float]:
    """The planning time, shared among the steps that surveyed (or planned, if none did)."""
    planning = [s for s in steps if s.config.plans]
    charged = [s.index for s in planning if s.compressor.needs_survey] or [s.index for s in planning]
    return {i: spent / len(charged) for i in charged}


def use_plans(model: nn.Module, steps: list[LayerStep], plans: dict[str, Any]) -> None:
    """Hand each planning step its plan; see the module docstring."""
    for position, step in enumerate(steps):
        if not step.config.plans:
            continue
        plan = plans[str(step.index)]
        step.compressor.use_plan(plan)
        kept = [n for n in step.names if plan.get(n) is None]
        if kept:
            log.warning("steps[%d] (%s): %d module(s) stay dense, e.g. %s", step.index, step.config.method,
                        len(kept), kept[0])
        step.names = [n for n in step.names if plan.get(n) is not None]
        if not step.names:
            raise CompressError(f"steps[{step.index}] ({step.config.method}): the plan leaves every targeted module "
                                "dense; lower keep (or the rank)")
        for later in steps[position + 1:]:
            for name in kept:  # the later step targeted this module's insides: it gets the whole module
                inside = [n for n in later.names if n.startswith(name + ".")]
                if inside:
                    later.names = [n for n in later.names if n not in inside] + [name]
                    later.unchecked -= set(inside)
                    later.config.check_module(name, model.get_submodule(name))
            for name in step.names:  # modules inside the planned outputs, at their planned shapes
                inside = [n for n in later.unchecked if n.startswith(name + ".")]
                if inside:
                    stand_in = step.config.projected(model.get_submodule(name), plan[name])
                    for n in inside:
                        later.config.check_module(n, stand_in.get_submodule(n[len(name) + 1:]))
                    later.unchecked -= set(inside)
