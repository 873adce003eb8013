"""Where the calibration activations wait between decoder layers: in memory, or on disk.

The engine keeps one `LayerCall` per calibration sample: the decoder layer's hidden states
[1, seq_len, hidden] plus every other argument the layer receives (attention mask, position
embeddings, cache flags). Between layers only the hidden states change, so a store holds the
other arguments once and replaces the hidden states as each layer is done.

- `MemoryActivations` (`offload: cpu`): all samples in CPU memory, samples x seq_len x hidden
  floats (64 x 512 x 2048 fp32 = 256 MB for a 1B model).
- `DiskActivations` (`offload: disk`): hidden states in one safetensors file per sample, so only
  the batch in flight is in memory. Files alternate between two slots: a layer's outputs are
  written to the other slot while its inputs are read, so an interrupted layer never leaves a
  mix of two layers' activations behind, and `--resume` finds the slot named in its progress.

Each store records itself for `--resume` with `save(folder)` and comes back with `load_activations`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

MEMORY_FILE = "activations.pt"
DISK_FOLDER = "activations"
CPU = torch.device("cpu")

Offload = Literal["cpu", "disk"]


@dataclass
class LayerCall:
    """The inputs of one decoder-layer call: hidden states [1, seq, hidden] plus everything else."""

    args: tuple
    kwargs: dict[str, Any]

    def to(self, device: torch.device) -> LayerCall:
        return LayerCall(_move(self.args, device), _move(self.kwargs, device))

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor | None) -> LayerCall:
        if self.args:
            return LayerCall((hidden, *self.args[1:]), self.kwargs)
        return LayerCall(self.args, {**self.kwargs, "hidden_states": hidden})


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def merge_calls(calls: list[LayerCall]) -> LayerCall:
    """One batched call for several samples: hidden states concatenated along the batch
    dimension, every other argument shared when all samples have the same (e.g. rotary cos/sin
    of the same positions) or concatenated when they differ (batch dimension 1 each); ValueError
    when an argument cannot be batched."""
    if len(calls) == 1:
        return calls[0]
    others = [c.with_hidden(None) for c in calls]
    merged = LayerCall(_merge([o.args for o in others]), _merge([o.kwargs for o in others]))
    return merged.with_hidden(torch.cat([c.hidden for c in calls]))  # [B, seq, hidden]


def _merge(values: list[Any]) -> Any:
    v = values[0]
    if isinstance(v, torch.Tensor):
        if all(torch.equal(v, o) for o in values[1:]):
            return v
        if v.dim() == 0 or any(o.shape[0] != 1 for o in values):
            raise ValueError(f"cannot batch a per-sample argument of shape {tuple(v.shape)}")
        return torch.cat(values)
    if isinstance(v, (tuple, list)):
        return type(v)(_merge([o[i] for o in values]) for i in range(len(v)))
    if isinstance(v, dict):
        return {k: _merge([o[k] for o in values]) for k in v}
    if any(o != v for o in values[1:]):
        raise ValueError(f"cannot batch samples whose argument differs: {v!r}")
    return v


def batches(calls: Iterable[LayerCall], size: int) -> Iterator[tuple[LayerCall, int]]:
    """(merged call, number of samples in it) for consecutive groups of up to `size` calls; a
    group whose arguments cannot be batched runs one sample at a time."""
    group: list[LayerCall] = []
    for call in calls:
        group.append(call)
        if len(group) == size:
            yield from _merged_or_single(group)
            group = []
    if group:
        yield from _merged_or_single(group)


def _merged_or_single(group: list[LayerCall]) -> Iterator[tuple[LayerCall, int]]:
    try:
        yield merge_calls(group), len(group)
    except ValueError:
        yield from ((c, 1) for c in group)


def _save_atomically(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class MemoryActivations:
    """Every sample's call in CPU memory."""

    def __init__(self) -> None:
        self.calls: list[LayerCall] = []

    def __len__(self) -> int:
        return len(self.calls)

    def __iter__(self) -> Iterator[LayerCall]:
        return iter(self.calls)

    def append(self, call: LayerCall) -> None:
        self.calls.append(call.to(CPU))

    def advance(self, run: Callable[[LayerCall], torch.Tensor], batch_size: int) -> None:
        """Replace each call's hidden states with its output from `run(batched call)` [B, ...]:
        the next layer's inputs."""
        outputs = [h for call, _ in batches(self.calls, batch_size) for h in run(call).to(CPU).split(1)]
        self.calls = [c.with_hidden(h) for c, h in zip(self.calls, outputs, strict=True)]

    def save(self, folder: Path) -> dict[str, Any]:
        _save_atomically([(c.args, c.kwargs) for c in self.calls], folder / MEMORY_FILE)
        return {"offload": "cpu"}


class DiskActivations:
    """Hidden states on disk (one file per sample, two slots), the other arguments in memory."""

    def __init__(self, folder: Path, slot: int = 0, rest: list[LayerCall] | None = None) -> None:
        self.folder, self.slot = folder, slot
        self.rest = rest or []  # each call with its hidden states left out (None)
        (folder / str(slot)).mkdir(parents=True, exist_ok=True)

    def _file(self, slot: int, index: int) -> Path:
        return self.folder / str(slot) / f"sample-{index:05d}.safetensors"

    def __len__(self) -> int:
        return len(self.rest)

    def __iter__(self) -> Iterator[LayerCall]:
        for i, call in enumerate(self.rest):
            yield call.with_hidden(load_file(self._file(self.slot, i))["hidden"])

    def _write(self, slot: int, index: int, hidden: torch.Tensor) -> None:
        save_file({"hidden": hidden.detach().to(CPU).contiguous()}, str(self._file(slot, index)))

    def append(self, call: LayerCall) -> None:
        self._write(self.slot, len(self.rest), call.hidden)
        self.rest.append(call.with_hidden(None).to(CPU))

    def advance(self, run: Callable[[LayerCall], torch.Tensor], batch_size: int) -> None:
        """Write each call's output from `run(batched call)` [B, ...] to the other slot, then
        switch to it."""
        other = 1 - self.slot
        (self.folder / str(other)).mkdir(exist_ok=True)
        i = 0
        for call, _ in batches(self, batch_size):
            for hidden in run(call).split(1):
                self._write(other, i, hidden)
                i += 1
        self.slot = other

    def save(self, folder: Path) -> dict[str, Any]:
        calls = folder / DISK_FOLDER / "calls.pt"
        if not calls.is_file():  # the other arguments never change: written once
            _save_atomically([(c.args, c.kwargs) for c in self.rest], calls)
        return {"offload": "disk", "slot": self.slot}


Activations = MemoryActivations | DiskActivations


def new_activations(offload: Offload, folder: Path) -> Activations:
    """An empty store; `folder` is where a disk store keeps its files."""
    if offload == "disk":
        shutil.rmtree(folder / DISK_FOLDER, ignore_errors=True)
        return DiskActivations(folder / DISK_FOLDER)
    return MemoryActivations()


def load_activations(folder: Path, record: dict[str, Any]) -> Activations:
    """The store that `save(folder)` recorded as `record`."""
    if record["offload"] == "disk":
        rest = torch.load(folder / DISK_FOLDER / "calls.pt", weights_only=True)
        return DiskActivations(folder / DISK_FOLDER, record["slot"], [LayerCall(a, k) for a, k in rest])
    store = MemoryActivations()
    store.calls = [LayerCall(a, k) for a, k in torch.load(folder / MEMORY_FILE, weights_only=True)]
    return store


def remove_activations(folder: Path) -> None:
    (folder / MEMORY_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder / DISK_FOLDER, ignore_errors=True)
