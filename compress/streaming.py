"""Streaming a model through the layer-wise engine, one decoder layer in memory at a time, with
progress kept on disk so that an interrupted run can resume.

The model is built without allocating its weights; the tensors outside the decoder layers
(embeddings, final norm, head) are loaded at the start; each layer's tensors are read from the
safetensors files when its turn comes, and written to the staging folder (one file per layer)
when it is compressed, after which the layer goes back to the meta device. After every layer the
staging folder also records what is done and the next layer's inputs, so `--resume` continues
from the last finished layer and produces the same checkpoint as an uninterrupted run.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .activations import Activations, load_activations
from .errors import CompressError

PROGRESS = "progress.json"


def layer_file(index: int) -> str:
    return f"layer-{index:05d}.safetensors"


class SafetensorsSource:
    """The tensors of a model folder, by name, read lazily from its safetensors files."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / f for name, f in weight_map.items()}
        else:
            self.files = {}
            for f in sorted(folder.glob("*.safetensors")):
                with self._open(f) as handle:
                    self.files.update({name: f for name in handle.keys()})

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, FileNotFoundError) as e:
            raise CompressError(f"cannot read tensor file {path}: {e}") from None

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for f, group in by_file.items():
            with self._open(f) as handle:
                out.update({n: handle.get_tensor(n) for n in group})
        return out

    def names_under(self, prefix: str) -> list[str]:
        return [n for n in self.files if n.startswith(prefix)]


def cast_floats(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def load_into(module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Assign `tensors` (full names) to `module` (named `prefix` in the model), strictly."""
    state = {k[len(prefix):]: v for k, v in tensors.items()}
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CompressError(
            f"{where}: the tensors of {prefix.rstrip('.')} do not fit the architecture "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    module.load_state_dict(state, strict=True, assign=True)


class StreamedLayers:
    """LayerIO that reads a layer's tensors from the source and writes it to `staging` when done."""

    def __init__(self, source: SafetensorsSource, staging: Path, device: torch.device,
                 dtype: torch.dtype | None) -> None:
        self.source, self.staging, self.device, self.dtype = source, staging, device, dtype

    def load(self, index: int, name: str, layer: nn.Module) -> None:
        tensors = cast_floats(self.source.read(self.source.names_under(name + ".")), self.dtype)
        load_into(layer, name + ".", tensors, "streaming")
        layer.to(self.device)

    def release(self, index: int, name: str, layer: nn.Module) -> None:
        state = {f"{name}.{k}": v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
        tmp = self.staging / (layer_file(index) + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.staging / layer_file(index))
        self.discard(index, name, layer)

    def discard(self, index: int, name: str, layer: nn.Module) -> None:
        layer.to("meta")
        _return_freed_memory()


def _load_malloc_trim():
    """glibc's malloc_trim, or None elsewhere. glibc raises its mmap threshold after large frees,
    so later layer-sized tensors come from the heap and freed ones stay resident (measured: +5 MB
    per layer of a 9 MB-per-layer model); trimming after each layer returns them to the system."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _return_freed_memory() -> None:
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# --- resume state ---------------------------------------------------------------------------
def save_progress(staging: Path, state: dict[str, Any], calls: Activations | None) -> None:
    """Record a finished layer: the run's state and where the next layer's inputs are (atomically)."""
    state["activations"] = calls.save(staging) if calls is not None else None
    tmp = staging / (PROGRESS + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, staging / PROGRESS)


def load_progress(staging: Path) -> tuple[dict[str, Any], Activations | None]:
    state = json.loads((staging / PROGRESS).read_text())
    record = state.get("activations")
    return state, load_activations(staging, record) if record else None


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Human-readable differences between two JSON-like values, e.g. ['steps.0.bits: 4 -> 3']."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += differences(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{path}.{i}")]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]
