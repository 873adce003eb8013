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
from .errors import CompressError
from .evaluate import EvalResult, evaluate
from .fsutil import check_output
from .interfaces import MethodConfig
from .loading import load_model
from .pipeline import Pipeline
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
    reports = [apply_step(model, step, i, progress) for i, step in enumerate(pipeline.steps)]
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
    unchanged = [c.name for c in changes if c.bytes_after == c.bytes_before and c.rel_error == 0.0]
    if unchanged:
        raise CompressError(
            f"{where}: changed nothing in {len(unchanged)} module(s), e.g. {unchanged[0]}; "
            "check the step's settings (a step must have an effect)"
        )
    return StepReport(index, step.method, step.model_dump(mode="json"), changes, time.perf_counter() - start)


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
