"""The layer-by-layer calibration engine that every data-driven method runs through.

1. Find the decoder layers without naming model attributes: modules of the classes the model
   declares unsplittable (`_no_split_modules`), else the longest ModuleList of repeated blocks,
   or the pipeline's `calibration.layers` override.
2. Capture the first layer's inputs for every calibration sample, with all keyword arguments
   (attention mask, position embeddings, cache flags), by a pre-hook that stops the forward.
3. For each layer: move it to the compute device; for each calibrated step, attach observers
   (forward hooks owned by the engine) to the step's modules in this layer, run every captured
   input through the layer, and let the step compress those modules; then re-run the layer so
   the next layer sees the *compressed* layer's outputs; move it back.

Only one layer's weights and the activations in flight are on the compute device; the captured
activations wait in CPU memory or on disk between layers (activations.py).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .activations import Activations, LayerCall, batches
from .errors import CompressError
from .interfaces import MethodConfig
from .progress import NullProgress, Progress
from .targets import select


class _StopForward(Exception):
    """Raised by the capture hook: nothing past the first decoder layer needs to run."""


def find_layers(model: nn.Module, override: str | None = None) -> list[tuple[str, nn.Module]]:
    """The decoder layers, in execution order, as (name, module)."""
    if override:
        names = select(model, [override], [], (nn.Module,)).names
        layers = [(n, model.get_submodule(n)) for n in names if not any(n.startswith(o + ".") for o in names)]
        if not layers:
            raise CompressError(f"calibration.layers '{override}' matches no module of the model")
        return layers
    classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [(n, m) for n, m in model.named_modules() if type(m).__name__ in classes]
    if layers:
        return layers
    lists = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1]
    if lists:
        name, longest = max(lists, key=lambda item: len(item[1]))
        return [(f"{name}.{i}", layer) for i, layer in enumerate(longest)]
    raise CompressError(
        f"cannot find the decoder layers of {type(model).__name__}: looked for modules of the classes in "
        f"_no_split_modules ({sorted(classes) or 'none declared'}) and for a ModuleList of repeated blocks; "
        "set calibration.layers to the layer class name or a 're:' pattern of their names"
    )


def place_outside_layers(model: nn.Module, layer_names: list[str], device: torch.device) -> None:
    """Move every parameter and buffer that is not inside a decoder layer to `device`."""
    prefixes = tuple(n + "." for n in layer_names)
    for name, module in model.named_modules():
        if name in layer_names or name.startswith(prefixes):
            continue
        module._apply(lambda t: t.to(device), recurse=False)


@torch.no_grad()
def capture_inputs(model: nn.Module, first_layer: nn.Module, samples: torch.Tensor, device: torch.device,
                   store: Activations) -> Activations:
    """Add the inputs of `first_layer` for each sample of `samples` [n, seq_len] to `store`."""

    def hook(_module, args, kwargs):
        store.append(LayerCall(args, kwargs))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for sample in samples:
            try:
                model(input_ids=sample[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return store


@dataclass
class LayerStep:
    """A step ready to run layer by layer: its config, compressor and the module names it targets.

    The compressor has `compress(name, module) -> nn.Module`; a calibrated one also has
    `observe(name, module, x)` (x: the module's input [batch, seq, in] for one batch of samples)
    and optionally `prepare_layer(model, layer_name, names, producers, consumers)`, called once per layer between
    observing and compressing, with the module whose output each module of the layer consumes
    (or None) and, for each producing module, the modules that consume its output.
    """

    index: int
    config: MethodConfig
    compressor: Any
    names: list[str]
    # Modules inside an earlier planning step's output, not checked yet: their shapes exist once
    # that step's plan does (planning.use_plans checks them then).
    unchecked: set[str] = field(default_factory=set)

    @property
    def calibrated(self) -> bool:
        return self.config.calibrated


class LayerIO(Protocol):
    """Where a decoder layer's weights live between its turns."""

    def load(self, index: int, name: str, layer: nn.Module) -> None:
        """Make the layer's tensors real, on the compute device."""

    def release(self, index: int, name: str, layer: nn.Module) -> None:
        """The layer is done (compressed): put it away."""

    def discard(self, index: int, name: str, layer: nn.Module) -> None:
        """The layer was only looked at (a survey pass): put it back unchanged."""


class InMemoryLayers:
    """The whole model is in memory: a layer visits the compute device and goes back."""

    def __init__(self, device: torch.device, home: torch.device) -> None:
        self.device, self.home = device, home

    def load(self, index: int, name: str, layer: nn.Module) -> None:
        layer.to(self.device)

    def release(self, index: int, name: str, layer: nn.Module) -> None:
        layer.to(self.home)

    discard = release


class _DenseView(nn.Module):
    """Computes exactly what a compressed module computes, F.linear(x, W, b), with W decoded once
    instead of on every call (a layer is run once per calibration sample)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.cache: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in self.cache:
            bias = getattr(self.module, "bias", None)
            self.cache[x.dtype] = (self.module.dequantized_weight(x.dtype), None if bias is None else bias.to(x.dtype))
        w, b = self.cache[x.dtype]
        return nn.functional.linear(x, w, b)


@contextmanager
def dense_views(layer: nn.Module) -> Iterator[None]:
    """Within the block, the layer's compressed modules run from their decoded weights (those
    made of other modules, such as low-rank factors, run those instead)."""
    swapped = [(name, m) for name, m in layer.named_modules()
               if hasattr(m, "dequantized_weight") and next(m.children(), None) is None]
    for name, m in swapped:
        layer.set_submodule(name, _DenseView(m))
    try:
        yield
    finally:
        for name, m in swapped:
            layer.set_submodule(name, m)


def _call(layer: nn.Module, call: LayerCall, device: torch.device) -> torch.Tensor:
    c = call.to(device)
    out = layer(*c.args, **c.kwargs)
    return out[0] if isinstance(out, tuple) else out


def check_inside_layers(steps: list[LayerStep], layer_names: list[str]) -> None:
    """Calibrated steps work inside decoder layers only (that is where their inputs are captured)."""
    prefixes = tuple(n + "." for n in layer_names)
    for step in steps:
        outside = [n for n in step.names if not n.startswith(prefixes)]
        if step.calibrated and outside:
            raise CompressError(
                f"steps[{step.index}] ({step.config.method}): {outside[0]} is outside the decoder layers, where "
                "calibrated methods work; add it to ignore (or quantize it with a data-free step)"
            )


@torch.no_grad()
def compress_layers(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    steps: list[LayerStep],
    io: LayerIO,
    device: torch.device,
    on_compressed: Callable[[LayerStep, str, nn.Module, nn.Module], None],
    calls: Activations | None = None,
    start: int = 0,
    on_layer_done: Callable[[int, Activations | None], None] = lambda i, calls: None,
    progress: Progress = NullProgress(),
    seconds: dict[int, float] | None = None,
    batch_size: int = 1,
) -> dict[int, float]:
    """Apply `steps` to the decoder layers from `start` on, one layer at a time; return seconds
    per step index (added to `seconds`, e.g. those of an interrupted run's finished layers).

    `calls` are the inputs of layer `start` (see capture_inputs), needed when a calibrated step
    still has modules at or after `start`; the layer runs `batch_size` samples per call. Each layer: io.load, then step after step (calibrated:
    observe, prepare, compress; data-free: compress), then the compressed layer is re-run to give
    the next layer's inputs, io.release, and on_layer_done(index, next calls).
    `on_compressed(step, name, old, new)` is called for every module replaced: the caller measures
    it and swaps it in.
    """
    seconds = seconds if seconds is not None else {s.index: 0.0 for s in steps}
    last_calibrated = max((i for i, (name, _) in enumerate(layers)
                           if any(s.calibrated and any(n.startswith(name + ".") for n in s.names) for s in steps)),
                          default=-1)
    with progress.task("Compressing layers", total=len(layers)) as advance:
        advance(start)
        for i in range(start, len(layers)):
            layer_name, layer = layers[i]
            io.load(i, layer_name, layer)
            for step in steps:
                t = time.perf_counter()
                names = [n for n in step.names if n.startswith(layer_name + ".")]
                if names and step.calibrated:
                    _observe_and_compress(model, layer_name, layer, step, names, calls, device, on_compressed,
                                          batch_size)
                else:
                    for name in names:
                        old = model.get_submodule(name)
                        on_compressed(step, name, old, step.compressor.compress(name, old))
                seconds[step.index] += time.perf_counter() - t
            if i < last_calibrated:  # a later layer still needs its (compressed) inputs
                with dense_views(layer):
                    calls.advance(lambda c: _call(layer, c, device), batch_size)
            else:
                calls = None
            io.release(i, layer_name, layer)
            on_layer_done(i, calls)
            advance(1)
    return seconds


def _observe_and_compress(model, layer_name: str, layer: nn.Module, step: LayerStep, names: list[str],
                          calls: Activations, device: torch.device, on_compressed, batch_size: int) -> None:
    """One observation pass over the layer, then compress the step's modules of this layer.

    While observing, the engine also notes which module of the layer produced each target's input
    (the very same tensor), so a method that rescales across operations (AWQ) can fold into the
    producer without naming model attributes. Outputs are held for the duration of one call, so
    their memory cannot be reused by another tensor and mistaken for it.
    """
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # data_ptr -> (module name, its output), one call
    producers: dict[str, str | None] = {}  # module name -> name of the module whose output it consumes
    consumers: dict[str, set[str]] = {}  # module name -> modules that consume its output
    handles = []

    def source_of(x) -> str | None:
        found = outputs.get(x.data_ptr()) if isinstance(x, torch.Tensor) else None
        return found[0] if found is not None and found[1].shape == x.shape else None

    prepare = getattr(step.compressor, "prepare_layer", None)
    # The producer map costs two hooks on every submodule for every sample: only for methods that use it.
    for sub_name, sub in (layer.named_modules() if prepare is not None else []):
        if not sub_name:
            continue

        def link(_m, inputs, name=f"{layer_name}.{sub_name}"):
            producers[name] = source_of(inputs[0]) if inputs else None
            if producers[name] is not None:
                consumers.setdefault(producers[name], set()).add(name)

        def record(_m, _inputs, output, name=f"{layer_name}.{sub_name}"):
            if isinstance(output, torch.Tensor):
                outputs[output.data_ptr()] = (name, output)

        handles += [sub.register_forward_pre_hook(link), sub.register_forward_hook(record)]
    for name in names:
        def observe(module, inputs, name=name):
            step.compressor.observe(name, module, inputs[0])

        handles.append(model.get_submodule(name).register_forward_pre_hook(observe))
    try:
        with dense_views(layer):
            for call, _ in batches(calls, batch_size):
                _call(layer, call, device)
                outputs.clear()
    finally:
        for h in handles:
            h.remove()
    if prepare is not None:  # e.g. AWQ: search and fold scales across the layer's modules
        prepare(model, layer_name, names, producers, consumers)
    for name in names:
        old = model.get_submodule(name)
        on_compressed(step, name, old, step.compressor.compress(name, old))


PROBE_SAMPLES = 8  # calibration samples on which a survey measures a stand-in's effect


@torch.no_grad()
def survey_layers(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    steps: list[LayerStep],
    io: LayerIO,
    device: torch.device,
    calls: Activations | None,
    progress: Progress = NullProgress(),
    batch_size: int = 1,
) -> None:
    """A pass over the *uncompressed* layers for planning steps (planning.py): each layer is
    loaded, the steps whose survey is calibrated observe it (while it computes the next layer's
    inputs, from `calls`), every step's `survey(name, module)` looks at its modules, and the layer
    is put back unchanged.

    `survey` may return a stand-in module; the engine then measures the relative change of the
    decoder layer's output ||Δout||² / ||out||² on the first PROBE_SAMPLES samples with the
    stand-in swapped in, and reports it through `measured(name, error)`.
    """
    last = max((i for i, (name, _) in enumerate(layers)
                if any(n.startswith(name + ".") for s in steps for n in s.names)), default=-1)
    with progress.task("Surveying layers", total=last + 1) as advance:
        for i in range(last + 1):
            layer_name, layer = layers[i]
            io.load(i, layer_name, layer)
            mine = [(s, [n for n in s.names if n.startswith(layer_name + ".")]) for s in steps]
            handles = [model.get_submodule(n).register_forward_pre_hook(
                lambda _m, inputs, s=s, n=n: s.compressor.observe(n, _m, inputs[0]))
                for s, names in mine if s.compressor.survey_calibrated for n in names]
            probe_inputs = list(itertools.islice(iter(calls), PROBE_SAMPLES)) if calls is not None else []
            try:
                if calls is not None:
                    calls.advance(lambda c: _call(layer, c, device), batch_size)
            finally:
                for h in handles:
                    h.remove()
            reference = None
            for step, names in mine:
                for name in names:
                    probe = step.compressor.survey(name, model.get_submodule(name))
                    if probe is None:
                        continue
                    if reference is None:
                        reference = _layer_outputs(layer, probe_inputs, device, batch_size)
                    step.compressor.measured(name, _changed_by(model, layer, name, probe, probe_inputs, reference,
                                                               device, batch_size))
            io.discard(i, layer_name, layer)
            advance(1)


def _layer_outputs(layer: nn.Module, inputs: list[LayerCall], device: torch.device, batch_size: int
                   ) -> list[torch.Tensor]:
    if not inputs:
        raise CompressError("a survey asked for a measurement without calibration inputs")
    return [_call(layer, call, device) for call, _ in batches(inputs, batch_size)]


def _changed_by(model: nn.Module, layer: nn.Module, name: str, stand_in: nn.Module, inputs: list[LayerCall],
                reference: list[torch.Tensor], device: torch.device, batch_size: int) -> float:
    """||Δout||² / ||out||² of the layer's outputs on `inputs` with `stand_in` in place of `name`."""
    original = model.get_submodule(name)
    model.set_submodule(name, stand_in.to(device))
    try:
        outputs = _layer_outputs(layer, inputs, device, batch_size)
    finally:
        model.set_submodule(name, original)
    change = sum((o.float() - r.float()).square().sum() for o, r in zip(outputs, reference))
    norm = sum(r.float().square().sum() for r in reference)
    return float(change / norm.clamp_min(1e-30))
