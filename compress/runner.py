"""Runs a pipeline: load, evaluate the base, apply each step, save, evaluate the result.

The runner never names a method: it resolves each step's targets with the shared matcher,
asks the step's config for a compressor, swaps the returned modules in, and measures what
changed. A step that changes nothing is an error.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint, targets
from .calibration import CalibratedStep, calibrate
from .data import load_text, token_windows
from .errors import CompressError
from .evaluate import EvalResult, evaluate
from .fsutil import check_output
from .interfaces import MethodConfig
from .loading import load_model, pick_device
from .pipeline import CalibrationConfig, Pipeline
from .progress import NullProgress, Progress
from .sizes import SizeReport, dense_weight_bytes, size_report


@dataclass
class ModuleChange:
    name: str
    before: str  # e.g. "Linear float32"
    after: str  # e.g. "int4 g64 sym"
    weights: int
    bytes_before: int
    bytes_after: int
    rel_error: float  # ||W - W'||_F / ||W||_F of the weight the module now computes with


@dataclass
class StepReport:
    index: int
    method: str
    config: dict[str, Any]
    modules: list[ModuleChange]
    seconds: float

    @property
    def bytes_before(self) -> int:
        return sum(m.bytes_before for m in self.modules)

    @property
    def bytes_after(self) -> int:
        return sum(m.bytes_after for m in self.modules)

    @property
    def bits_per_weight(self) -> float:
        return self.bytes_after * 8 / sum(m.weights for m in self.modules)

    def summary(self) -> dict[str, Any]:
        errors = [m.rel_error for m in self.modules]
        return {
            "method": self.method,
            "modules": len(self.modules),
            "formats": sorted({m.after for m in self.modules}),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "bits_per_weight": self.bits_per_weight,
            "mean_rel_error": sum(errors) / len(errors),
            "max_rel_error": max(errors),
            "seconds": self.seconds,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "config": self.config, **self.summary(),
                "per_module": [asdict(m) for m in self.modules]}


@dataclass
class RunResult:
    model: str
    model_path: Path
    output: Path | None
    steps: list[StepReport]
    base_size: SizeReport
    size: SizeReport
    base_disk_bytes: int
    disk_bytes: int | None
    base_eval: EvalResult | None = None
    eval: EvalResult | None = None
    seconds: float = 0.0
    manifest: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_path": str(self.model_path),
            "output": str(self.output) if self.output else None,
            "steps": [s.to_dict() for s in self.steps],
            "base": {"disk_bytes": self.base_disk_bytes, **self.base_size.to_dict(),
                     **(self.base_eval.to_dict() if self.base_eval else {})},
            "compressed": {"disk_bytes": self.disk_bytes, **self.size.to_dict(),
                           **(self.eval.to_dict() if self.eval else {})},
            "seconds": self.seconds,
        }


def folder_tensor_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in checkpoint.tensor_files(path))


def run(
    pipeline: Pipeline, output: str | Path | None = None, overwrite: bool = False, progress: Progress = NullProgress()
) -> RunResult:
    """Run `pipeline`; `output` overrides `pipeline.output`."""
    start = time.perf_counter()
    target = Path(output or pipeline.output) if (output or pipeline.output) else None
    if target is not None:
        check_output(target, overwrite)  # before any long work
    model, tokenizer, path = load_model(
        pipeline.model, pipeline.dtype, pipeline.device, pipeline.trust_remote_code, pipeline.allow_pickle, progress
    )
    base_eval = reference = None
    if pipeline.eval is not None:
        base_eval, reference = evaluate(
            model, tokenizer, pipeline.eval, keep_reference=pipeline.eval.fidelity_windows > 0,
            progress=progress, label="base model",
        )
    base_size = size_report(model)
    reports = compress_model(model, tokenizer, pipeline, progress)
    manifest: dict[str, Any] = {}
    disk_bytes = None
    if target is not None:
        manifest = checkpoint.save(
            model, tokenizer, target,
            {"base_model": {"ref": pipeline.model, "path": str(path), "model_type": model.config.model_type},
             "pipeline": pipeline.model_dump(mode="json"),
             "steps": [{"method": s.method, "version": type(c).version, "config": s.config, "report": s.summary()}
                       for s, c in zip(reports, pipeline.steps)]},
            overwrite,
        )
        disk_bytes = manifest["tensor_bytes"]
    comp_eval = None
    if pipeline.eval is not None:
        comp_eval, _ = evaluate(model, tokenizer, pipeline.eval, reference=reference, progress=progress,
                                label="compressed model")
    return RunResult(
        model=pipeline.model, model_path=path, output=target, steps=reports, base_size=base_size,
        size=size_report(model), base_disk_bytes=folder_tensor_bytes(path), disk_bytes=disk_bytes,
        base_eval=base_eval, eval=comp_eval, seconds=time.perf_counter() - start, manifest=manifest,
    )


def compress_model(model: nn.Module, tokenizer, pipeline: Pipeline, progress: Progress = NullProgress()
                   ) -> list[StepReport]:
    """Apply the pipeline's steps in order. Consecutive calibrated steps share one layer-by-layer
    pass (each layer: step after step, then the layer's compressed outputs feed the next)."""
    reports: list[StepReport] = []
    indexed = list(enumerate(pipeline.steps))
    while indexed:
        calibrated = type(indexed[0][1]).needs_calibration
        n = next((k for k, (_, s) in enumerate(indexed) if type(s).needs_calibration != calibrated), len(indexed))
        group, indexed = indexed[:n], indexed[n:]
        if calibrated:
            reports += apply_calibrated_steps(model, tokenizer, group, pipeline, progress)
        else:
            reports += [apply_step(model, step, i, progress) for i, step in group]
    return reports


def calibration_samples(tokenizer, config: CalibrationConfig, model_config) -> torch.Tensor:
    """The calibration token windows [samples, seq_len]; refuses lengths the model cannot take."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and config.seq_len > limit:
        raise CompressError(
            f"calibration.seq_len {config.seq_len} is above the model's limit of {limit} positions "
            "(max_position_embeddings); use a shorter seq_len"
        )
    text = load_text(config.data, config.split, config.text_field)
    return token_windows(tokenizer, text, config.samples, config.seq_len, f"calibration data '{config.data}'")


def apply_calibrated_steps(model: nn.Module, tokenizer, group: list[tuple[int, MethodConfig]], pipeline: Pipeline,
                           progress: Progress = NullProgress()) -> list[StepReport]:
    """Run calibrated steps through the layer-by-layer engine; report and verify each."""
    samples = calibration_samples(tokenizer, pipeline.calibration, model.config)
    claimed: set[str] = set()
    steps = []
    for index, step in group:
        where = f"steps[{index}] ({step.method})"
        names = [n for n in targets.resolve(model, step.targets, step.ignore, step.supported_modules, where)
                 if n not in claimed]
        if not names:
            raise CompressError(f"{where}: every module it targets is already taken by an earlier step")
        claimed.update(names)
        steps.append(CalibratedStep(index, step, step.build(), names))
    changes: dict[int, list[ModuleChange]] = {s.index: [] for s in steps}

    def on_compressed(step: CalibratedStep, name: str, old: nn.Module, new: nn.Module) -> None:
        changes[step.index].append(_measure(name, old, new))
        _untie_if_shared(model, name)
        model.set_submodule(name, new)

    seconds = calibrate(model, steps, samples, pick_device(pipeline.device), on_compressed,
                        pipeline.calibration.layers, progress)
    reports = []
    for s in steps:
        _verify(f"steps[{s.index}] ({s.config.method})", changes[s.index])
        reports.append(StepReport(s.index, s.config.method, s.config.model_dump(mode="json"), changes[s.index],
                                  seconds[s.index]))
    return reports


@torch.no_grad()
def apply_step(model: nn.Module, step: MethodConfig, index: int, progress: Progress = NullProgress()) -> StepReport:
    """Compress the modules `step` targets, in place in `model`; report and verify the effect."""
    where = f"steps[{index}] ({step.method})"
    start = time.perf_counter()
    names = targets.resolve(model, step.targets, step.ignore, step.supported_modules, where)
    compressor = step.build()
    changes = []
    with progress.task(f"Step {index}: {step.method}", total=len(names)) as advance:
        for name in names:
            module = model.get_submodule(name)
            new = compressor.compress(name, module)
            changes.append(_measure(name, module, new))
            _untie_if_shared(model, name)
            model.set_submodule(name, new)
            advance(1)
    _verify(where, changes)
    return StepReport(index, step.method, step.model_dump(mode="json"), changes, time.perf_counter() - start)


def _verify(where: str, changes: list[ModuleChange]) -> None:
    """A step must have an effect on every module it was given."""
    unchanged = [c.name for c in changes if c.bytes_after == c.bytes_before and c.rel_error == 0.0]
    if unchanged:
        raise CompressError(
            f"{where}: changed nothing in {len(unchanged)} module(s), e.g. {unchanged[0]}; "
            "check the step's settings (a step must have an effect)"
        )


def _measure(name: str, old: nn.Module, new: nn.Module) -> ModuleChange:
    w = old.weight.detach().float()
    w_new = new.dequantized_weight(torch.float32)
    rel = ((w - w_new).norm() / w.norm().clamp_min(1e-30)).item()
    return ModuleChange(
        name=name,
        before=f"{type(old).__name__} {str(old.weight.dtype).removeprefix('torch.')}",
        after=new.describe(),
        weights=new.num_weights(),
        bytes_before=dense_weight_bytes(old),
        bytes_after=new.storage_bytes(),
        rel_error=rel,
    )


def _untie_if_shared(model: nn.Module, name: str) -> None:
    """A replaced module whose weight is tied to another (an output head tied to the embeddings)
    stops sharing it: the config must no longer ask for tying, or reloading would re-tie."""
    weight = model.get_submodule(name).weight
    shared = any(p is weight for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith(name + "."))
    if shared:
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False
