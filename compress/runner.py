"""Runs a pipeline: load, evaluate the base, apply each step, save, evaluate the result.

The runner never names a method: it resolves each step's targets with the shared matcher,
asks the step's config for a compressor, swaps the returned modules in, and measures what
changed. A step that changes nothing is an error.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint, targets
from .activations import Activations, new_activations, remove_activations
from .calibration import (
    InMemoryLayers,
    LayerStep,
    capture_inputs,
    check_inside_layers,
    compress_layers,
    find_layers,
    place_outside_layers,
)
from .data import load_text, token_windows
from .errors import CompressError, Interrupted
from .evaluate import EvalResult, evaluate
from .fsutil import check_output, replace_dir
from .interfaces import MethodConfig
from .loading import DTYPES, load_model, pick_device, place, prepare_kernels
from .models import is_checkpoint, resolve
from .pipeline import CalibrationConfig, Pipeline
from .planning import plan_steps, surveying_seconds, use_plans
from .streaming import (
    PROGRESS,
    SafetensorsSource,
    StreamedLayers,
    differences,
    cast_floats,
    layer_file,
    load_progress,
    save_progress,
)
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
    read_by: list[str] = field(default_factory=list)  # modules reading its tensors (embeddings tied to a head)


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
    pipeline: Pipeline, output: str | Path | None = None, overwrite: bool = False, resume: bool = False,
    progress: Progress = NullProgress(),
) -> RunResult:
    """Run `pipeline`; `output` overrides `pipeline.output`.

    The base model is evaluated (if asked) on its own; compression then streams the model layer
    by layer into a staging folder (`OUT.partial`, kept if the run is interrupted, so that
    `resume=True` continues it), which becomes the checkpoint; the compressed model is evaluated
    by loading that checkpoint, so every reported number is the saved model's.
    """
    start = time.perf_counter()
    target = Path(output or pipeline.output) if (output or pipeline.output) else None
    if target is not None:
        check_output(target, overwrite)  # before any long work
    path = resolve(pipeline.model, pipeline.allow_pickle, progress)
    if is_checkpoint(path):
        raise CompressError(f"{path} is already a compressed checkpoint; compress its base model instead, with all "
                            "the steps in one pipeline")
    if not (any(path.glob("*.safetensors")) or (path / checkpoint.INDEX_NAME).is_file()):
        raise CompressError(f"{path}: compression streams safetensors weights; convert the pickle weights first")
    tokenizer = load_tokenizer(path, pipeline.trust_remote_code)
    base_eval = reference = None
    if pipeline.eval is not None:
        model = load_model(str(path), pipeline.dtype, pipeline.device, pipeline.trust_remote_code,
                           pipeline.allow_pickle, progress)[0]
        base_eval, reference = evaluate(model, tokenizer, pipeline.eval, keep_reference=pipeline.eval.fidelity_windows
                                        > 0, progress=progress, label="base model")
        del model
    staging = Path(f"{target}.partial") if target is not None else Path(tempfile.mkdtemp(prefix="compress-"))
    try:
        reports, base_size, size, manifest = compress_streamed(pipeline, path, tokenizer, staging, resume, progress)
        final = staging
        if target is not None:
            replace_dir(staging, target, overwrite)
            final = target
        comp_eval = None
        if pipeline.eval is not None:
            model = prepare_kernels(place(checkpoint.load(final, pipeline.trust_remote_code), pipeline.device))
            comp_eval, _ = evaluate(model, tokenizer, pipeline.eval, reference=reference, progress=progress,
                                    label="compressed model")
    finally:
        if target is None:
            shutil.rmtree(staging, ignore_errors=True)
    return RunResult(
        model=pipeline.model, model_path=path, output=target, steps=reports, base_size=base_size, size=size,
        base_disk_bytes=folder_tensor_bytes(path), disk_bytes=manifest["tensor_bytes"] if target else None,
        base_eval=base_eval, eval=comp_eval, seconds=time.perf_counter() - start, manifest=manifest,
    )


def load_tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def _resume_key(pipeline: Pipeline) -> dict[str, Any]:
    """What must not change between an interrupted run and its resumption."""
    return pipeline.model_dump(mode="json", exclude={"eval", "output"})


def compress_streamed(pipeline: Pipeline, path: Path, tokenizer, staging: Path, resume: bool,
                      progress: Progress = NullProgress()) -> tuple[list[StepReport], SizeReport, SizeReport, dict]:
    """Compress the model at `path` into the checkpoint folder `staging`, one layer in memory at a time."""
    device = pick_device(pipeline.device)
    dtype = None if pipeline.dtype == "auto" else DTYPES[pipeline.dtype]
    model, layers, source = _model_without_layer_weights(path, pipeline, dtype)
    layer_names = [n for n, _ in layers]
    prefixes = tuple(n + "." for n in layer_names)
    base_size = size_report(model)
    steps = prepare_steps(model, pipeline.steps)
    check_inside_layers(steps, layer_names)
    state, calls = _start_or_resume(staging, resume, _resume_key(pipeline), steps)
    done = state["layers_done"]
    # Layers finished before an interruption: rebuild their compressed modules (on meta) from
    # the recorded changes, so the model's structure is as if they had just been done.
    for index, recorded in state["changes"].items():
        for change in recorded:
            if change["name"].startswith(tuple(f"{n}." for n in layer_names[:done])):
                _swap_recorded(model, change)
    for name, layer in layers[:done]:
        layer.to("meta")
    samples = None

    def capture(folder: Path) -> Activations:
        nonlocal samples
        if samples is None:
            samples = calibration_samples(tokenizer, pipeline.calibration, model.config)
        place_outside_layers(model, layer_names, device)
        with progress.task("Capturing calibration inputs", total=None):
            return capture_inputs(model, layers[0][1], samples, device,
                                  new_activations(pipeline.calibration.offload, folder))

    plans = state.setdefault("plans", {})
    if any(s.config.plans for s in steps) and not plans:  # a resumed run keeps the plans it started with
        t = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="compress-survey-", dir=staging) as folder:
                plans.update(plan_steps(model, lambda: layers, steps, StreamedLayers(source, staging, device, dtype),
                                        device, lambda: capture(Path(folder)), progress,
                                        pipeline.calibration.batch_size))
            use_plans(model, steps, plans)
        except BaseException as e:  # nothing worth resuming before the plan is recorded
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, KeyboardInterrupt):
                raise Interrupted("interrupted while planning, before any layer was compressed; nothing was kept") from None
            if is_out_of_memory(e):
                raise CompressError(out_of_memory_advice(e, "the survey pass", device, pipeline, None)) from None
            raise
        for index, spent in surveying_seconds(steps, time.perf_counter() - t).items():
            state["seconds"][str(index)] += spent
        save_progress(staging, state, None)
    else:
        use_plans(model, steps, plans)
    needs_calls = any(s.calibrated for s in steps) and done < len(layers)
    if needs_calls and calls is None:
        calls = capture(staging)
    # The embeddings and head are not needed again until the end (for a large vocabulary they
    # are the biggest tensors in memory): off until then.
    place_outside_layers(model, layer_names, torch.device("meta"))
    seconds = {s.index: state["seconds"][str(s.index)] for s in steps}  # carried over a resumed run

    def on_compressed(step: LayerStep, name: str, old: nn.Module, new: nn.Module) -> None:
        change = _measure(name, old, new, _untie_if_shared(model, name, new))
        state["changes"][str(step.index)].append({**asdict(change), "format": type(new).__name__,
                                                  "spec": new.format_spec()})
        model.set_submodule(name, new)

    def on_layer_done(i: int, next_calls) -> None:
        state["layers_done"] = i + 1
        state["seconds"] = {str(k): v for k, v in seconds.items()}
        save_progress(staging, state, next_calls)

    io = StreamedLayers(source, staging, device, dtype)
    try:
        compress_layers(model, layers, steps, io, device, on_compressed, calls, done, on_layer_done, progress,
                        seconds, pipeline.calibration.batch_size)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted after {state['layers_done']} of {len(layers)} layers; they are kept in {staging}: "
            "run the same command with --resume to continue"
        ) from None
    except CompressError:  # bad input found on the way: nothing worth resuming
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        raise CompressError(out_of_memory_advice(e, layer_names[state["layers_done"]], device, pipeline, staging)
                            ) from None
    _load_outside_layers(model, source, prefixes, dtype)
    for step in steps:  # data-free steps on modules outside the layers (e.g. the head)
        t = time.perf_counter()
        for name in step.names:
            if not name.startswith(prefixes):
                old = model.get_submodule(name)
                on_compressed(step, name, old, step.compressor.compress(name, old))
        seconds[step.index] += time.perf_counter() - t
    reports = []
    for step in steps:
        changes = [ModuleChange(**{k: v for k, v in c.items() if k not in ("format", "spec")})
                   for c in state["changes"][str(step.index)]]
        _verify(f"steps[{step.index}] ({step.config.method})", changes)
        reports.append(StepReport(step.index, step.config.method, step.config.model_dump(mode="json"), changes,
                                  seconds[step.index]))
    manifest = checkpoint.finish_streamed(
        model, tokenizer, staging, [layer_file(i) for i in range(len(layers))], layer_names,
        {"base_model": {"ref": pipeline.model, "path": str(path), "model_type": model.config.model_type},
         "pipeline": pipeline.model_dump(mode="json"),
         "steps": [{"method": r.method, "version": type(s.config).version, "config": r.config, "report": r.summary()}
                   for r, s in zip(reports, steps)]},
    )
    (staging / PROGRESS).unlink()
    remove_activations(staging)
    return reports, base_size, size_report(model), manifest


def _model_without_layer_weights(path: Path, pipeline: Pipeline, dtype: torch.dtype | None):
    """(model whose decoder layers are on the meta device and the rest loaded, its layers, the
    tensor source)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=pipeline.trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=pipeline.trust_remote_code)
    model.eval()
    layers = find_layers(model, pipeline.calibration.layers)
    prefixes = tuple(n + "." for n, _ in layers)
    source = SafetensorsSource(path)
    _load_outside_layers(model, source, prefixes, dtype)
    unloaded = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                if t.is_meta and not n.startswith(prefixes)]
    if unloaded:
        raise CompressError(f"{path} lacks tensors for {', '.join(unloaded[:3])}")
    return model, layers, source


def _load_outside_layers(model: nn.Module, source: SafetensorsSource, prefixes: tuple[str, ...],
                         dtype: torch.dtype | None) -> None:
    """Read every tensor outside the decoder layers (embeddings, final norm, head) into the model."""
    model.load_state_dict(cast_floats(source.read([n for n in source.files if not n.startswith(prefixes)]), dtype),
                          strict=False, assign=True)
    model.tie_weights()


def _start_or_resume(staging: Path, resume: bool, key: dict[str, Any], steps: list[LayerStep]):
    """(run state, next layer's inputs or None): fresh in an emptied staging folder, or the
    interrupted run's, after checking that it ran the same pipeline."""
    if resume:
        if not (staging / PROGRESS).is_file():
            raise CompressError(f"--resume: there is no interrupted run to continue ({staging} does not exist)")
        state, calls = load_progress(staging)
        diff = differences(state["pipeline"], key)
        if diff:
            raise CompressError(f"--resume: the pipeline differs from the interrupted run's ({'; '.join(diff[:3])}); "
                                f"run without --resume to start over")
        return state, calls
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
    except OSError as e:
        raise CompressError(f"cannot write output folder {staging}: {e.strerror}") from None
    state = {"pipeline": key, "layers_done": 0, "changes": {str(s.index): [] for s in steps},
             "seconds": {str(s.index): 0.0 for s in steps}, "activations": None}
    return state, None


def _swap_recorded(model: nn.Module, change: dict[str, Any]) -> None:
    from .registry import format_class

    model.set_submodule(change["name"], format_class(change["format"]).from_spec(change["spec"], device="meta"))


def prepare_steps(model: nn.Module, configs: list[MethodConfig]) -> list[LayerStep]:
    """Resolve each step's targets; a module goes to the first step that targets it.

    A planning step whose outputs contain modules (a low-rank module's two factors:
    `config.projected`) lets later steps target those: while later targets are resolved, an
    empty stand-in of the step's output sits in the model (restored afterwards); the modules
    found inside it are checked at their planned shapes once the plan exists (planning.py).
    """
    claimed: set[str] = set()
    steps = []
    originals: dict[str, nn.Module] = {}  # module name -> the module a stand-in replaces for now
    try:
        for index, config in enumerate(configs):
            where = f"steps[{index}] ({config.method})"
            names = [n for n in targets.resolve(model, config.targets, config.ignore, config.supported_modules,
                                                where) if n not in claimed]
            if not names:
                raise CompressError(f"{where}: every module it targets is already taken by an earlier step")
            inside = {n for n in names if any(n.startswith(o + ".") for o in originals)}
            if inside and config.plans:
                raise CompressError(f"{where}: plans across its modules, so it cannot take modules inside an earlier "
                                    f"step's output (e.g. {min(inside)}); narrow its targets")
            for name in names:  # shapes are known before any weight is read: fail before long work
                if name not in inside:
                    config.check_module(name, model.get_submodule(name))
            claimed.update(names)
            steps.append(LayerStep(index, config, config.build(), names, unchecked=inside))
            for name in names:
                stand_in = config.projected(model.get_submodule(name)) if config.plans else None
                if stand_in is not None:
                    originals[name] = model.get_submodule(name)
                    model.set_submodule(name, stand_in)
    finally:
        for name, original in reversed(originals.items()):
            model.set_submodule(name, original)
    return steps


def compress_model(model: nn.Module, tokenizer, pipeline: Pipeline, progress: Progress = NullProgress()
                   ) -> list[StepReport]:
    """Apply the pipeline's steps to a model held whole in memory (the Python API's path), through
    the same layer-wise engine as streaming."""
    device = pick_device(pipeline.device)
    home = next(model.parameters()).device
    steps = prepare_steps(model, pipeline.steps)
    calibrated = any(s.calibrated for s in steps)
    layers = find_layers(model, pipeline.calibration.layers) if calibrated else []
    layer_names = [n for n, _ in layers]
    check_inside_layers(steps, layer_names)
    changes: dict[int, list[ModuleChange]] = {s.index: [] for s in steps}

    def on_compressed(step: LayerStep, name: str, old: nn.Module, new: nn.Module) -> None:
        changes[step.index].append(_measure(name, old, new, _untie_if_shared(model, name, new)))
        model.set_submodule(name, new)

    seconds = {s.index: 0.0 for s in steps}
    samples = None

    def capture(folder: Path) -> Activations:
        """The first layer's calibration inputs (for a survey, also when compressing is data-free)."""
        nonlocal samples
        found = layers or find_layers(model, pipeline.calibration.layers)
        if samples is None:
            samples = calibration_samples(tokenizer, pipeline.calibration, model.config)
        place_outside_layers(model, [n for n, _ in found], device)
        return capture_inputs(model, found[0][1], samples, device, new_activations(pipeline.calibration.offload, folder))

    if any(s.config.plans for s in steps):
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="compress-survey-") as folder:
            use_plans(model, steps, plan_steps(model, lambda: layers or find_layers(model, pipeline.calibration.layers),
                                               steps, InMemoryLayers(device, home), device,
                                               lambda: capture(Path(folder)), progress,
                                               pipeline.calibration.batch_size))
        for index, spent in surveying_seconds(steps, time.perf_counter() - t).items():
            seconds[index] += spent
    if calibrated:
        with tempfile.TemporaryDirectory(prefix="compress-activations-") as folder:
            calls = capture(Path(folder))
            try:
                compress_layers(model, layers, steps, InMemoryLayers(device, home), device, on_compressed, calls,
                                progress=progress, seconds=seconds, batch_size=pipeline.calibration.batch_size)
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                raise CompressError(out_of_memory_advice(e, "a decoder layer", device, pipeline, None)) from None
    if samples is not None:  # something was captured: the embeddings and head go home
        place_outside_layers(model, layer_names or [n for n, _ in find_layers(model, pipeline.calibration.layers)],
                             home)
    prefixes = tuple(n + "." for n in layer_names)
    for step in steps:
        t = time.perf_counter()
        for name in step.names:
            if not layer_names or not name.startswith(prefixes):
                on_compressed(step, name, model.get_submodule(name),
                              step.compressor.compress(name, model.get_submodule(name)))
        seconds[step.index] += time.perf_counter() - t
    reports = []
    for step in steps:
        _verify(f"steps[{step.index}] ({step.config.method})", changes[step.index])
        reports.append(StepReport(step.index, step.config.method, step.config.model_dump(mode="json"),
                                  changes[step.index], seconds[step.index]))
    return reports


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def out_of_memory_advice(error: BaseException, where: str, device: torch.device, pipeline: Pipeline,
                         staging: Path | None) -> str:
    """The one-line message for running out of memory, with the settings that lower it."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    c = pipeline.calibration
    keep = f"; the finished layers are kept in {staging}: add --resume to continue" if staging else ""
    return (f"out of memory on {device} in {where} ({text}): lower calibration.batch_size ({c.batch_size}), "
            f"samples ({c.samples}) or seq_len ({c.seq_len}), or set calibration.offload: disk (now {c.offload}) so "
            f"activations wait on disk{keep}")


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


def _verify(where: str, changes: list[ModuleChange]) -> None:
    """A step must have an effect on every module it was given."""
    unchanged = [c.name for c in changes if c.bytes_after == c.bytes_before and c.rel_error == 0.0]
    if unchanged:
        raise CompressError(
            f"{where}: changed nothing in {len(unchanged)} module(s), e.g. {unchanged[0]}; "
            "check the step's settings (a step must have an effect)"
        )


def _measure(name: str, old: nn.Module, new: nn.Module, readers: list[str] | None = None) -> ModuleChange:
    """`old` -> `new`; `readers`: other modules that now read `new`'s tensors (tied embeddings)."""
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
        read_by=readers or [],
    )


def _untie_if_shared(model: nn.Module, name: str, new: nn.Module) -> list[str]:
    """Module `name`, about to be replaced by `new`, may share its weight with others (an output
    head tied to the embeddings). Those that `new` can serve from its own tensors (its
    `tied_embedding`: embeddings reading a quantized head's codes, quant/embedding.py) are
    replaced by such a view and stay tied; the others keep the float weight on their own. Either
    way the config stops asking for tying, or reloading would tie the float weights again.
    Returns the names of the modules that now read `new`'s tensors."""
    weight = model.get_submodule(name).weight
    owners = [n.rpartition(".")[0] for n, p in model.named_parameters(remove_duplicate=False)
              if p is weight and not n.startswith(name + ".") and n.endswith(".weight")]
    if not owners:
        return []
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    readers = []
    for owner in owners:
        view = new.tied_embedding(name, model.get_submodule(owner)) if hasattr(new, "tied_embedding") else None
        if view is not None:
            model.set_submodule(owner, view)
            readers.append(owner)
    return readers
