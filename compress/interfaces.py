"""Contracts between the runner and the method families.

This module sits at the bottom of the stack: the families (`compress.quant`, ...) import it,
and it imports nothing from the runner.

- A method is a pydantic config class (one per method, registered by entry point) whose
  fields are exactly the keys of a pipeline step, plus `targets` / `ignore`.
- `config.build()` returns a `Compressor`; the runner hands it each targeted module.
- A compressed module format is an `nn.Module` whose state lives in registered buffers (so the
  state dict is the file format) and which can describe itself (`format_spec`) well enough to be
  rebuilt empty on the meta device (`from_spec`) before its tensors are loaded.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class MethodConfig(BaseModel):
    """Base of every method config; a pipeline step validates into one of these."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Registered name of the method; set by each subclass as a Literal so dumps are self-describing.
    method: str
    targets: list[str] = Field(
        default_factory=lambda: ["Linear"],
        description="Modules to compress: class names, module names (or their trailing parts), "
        "or 're:<regex>' over full module names. A container selects the modules inside it.",
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="Modules to leave alone, in the same syntax as targets. "
        "The output head is ignored by default; embeddings are never targeted by Linear methods.",
    )

    # Bumped when a method's meaning changes, recorded in checkpoints.
    version: ClassVar[int] = 1
    # Module classes the method knows how to compress; targets are filtered to these.
    supported_modules: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)
    # Data-free methods get modules one at a time; calibrated ones go through the engine.
    needs_calibration: ClassVar[bool] = False
    # Planning methods decide across all their modules before compressing any (PlanningCompressor).
    plans: ClassVar[bool] = False

    @property
    def calibrated(self) -> bool:
        """Whether this step runs on calibration data: the class's needs_calibration, unless a
        method decides from its fields."""
        return type(self).needs_calibration

    def build(self) -> Compressor:
        raise NotImplementedError(f"{type(self).__name__} does not define build()")

    def projected(self, module: nn.Module, plan: Any = None) -> nn.Module | None:
        """For planning methods: an empty stand-in (meta device) for what this step will put in
        place of `module` (at its plan entry, if known), when later steps may target modules
        inside it; None when they may not."""
        return None

    def check_module(self, name: str, module: nn.Module) -> None:
        """Raise CompressError if the method cannot apply to this module (called on the meta
        device before any work, so only shapes and types are available)."""


class Compressor(Protocol):
    """What a step does to one module: return its compressed replacement."""

    def compress(self, name: str, module: nn.Module) -> nn.Module: ...


class PlanningCompressor(Compressor, Protocol):
    """The compressor of a planning method (`plans = True`); compress/planning.py drives it."""

    needs_survey: bool  # wants a survey pass over the uncompressed layers before allocating
    survey_calibrated: bool  # that survey observes calibration inputs (observe(name, module, x))

    def check_plan(self, modules: dict[str, nn.Module], model_params: int) -> None:
        """Raise CompressError for what shapes alone refuse (called before any long work)."""
        ...

    def survey(self, name: str, module: nn.Module) -> nn.Module | None:
        """Look at an uncompressed module; optionally return a stand-in whose effect on its decoder
        layer's output the engine measures and reports through measured(name, error)."""
        ...

    def measured(self, name: str, layer_error: float) -> None: ...

    def allocate(self, modules: dict[str, nn.Module], model_params: int) -> dict[str, Any]:
        """The plan: an entry per module (JSON-serialisable), None for modules left alone."""
        ...

    def use_plan(self, plan: dict[str, Any]) -> None:
        """Adopt a plan (one just allocated, or the one an interrupted run recorded)."""
        ...


class CompressedModule(Protocol):
    """A module format the checkpoint loader can rebuild from the manifest."""

    def format_spec(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable) that rebuild this module empty."""
        ...

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: torch.device | str = "meta") -> nn.Module: ...

    def num_weights(self) -> int:
        """Number of weights of the dense layer this module stands for."""
        ...

    def storage_bytes(self) -> int:
        """Bytes of the tensors that encode the weight (packed values, scales, zeros, metadata)."""
        ...

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [out, in] the module computes with (for error reports and checks)."""
        ...

    def describe(self) -> str:
        """A short human-readable format, e.g. 'int4 g64 sym'."""
        ...
