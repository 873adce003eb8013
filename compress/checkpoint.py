"""Checkpoints: a Hugging Face-style folder of config, tokenizer, safetensors and a manifest.

    OUT/
      config.json, generation_config.json, tokenizer files
      model.safetensors             (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
      compress.json                 the manifest: format version, versions of the tools, base model,
                                    each step with its config and report, every compressed module's
                                    format and constructor spec, sizes

Loading never trusts file names: the manifest says which modules to rebuild and how. The model
is built without allocating its weights (accelerate's init_empty_weights; buffers such as rotary
tables are still computed), compressed modules are swapped in on the meta device, and the tensors
are loaded with `assign=True`, so nothing is allocated twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CompressError
from .fsutil import atomic_dir
from .models import MANIFEST_NAME
from .registry import format_class

FORMAT = "compress-checkpoint"
VERSION = 1
INDEX_NAME = "model.safetensors.index.json"
MAX_SHARD_SIZE = "4GB"


def versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"compress": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _unique_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without the duplicate names of shared (tied) tensors, and alias -> kept name."""
    state: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int], str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_meta:  # streamed layers are written on their own
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen and tensor.numel() > 0:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        state[name] = tensor.detach().contiguous()
    return state, aliases


def write_tensors(state: dict[str, torch.Tensor], folder: Path) -> int:
    """Write safetensors shards (with an index when more than one); return the bytes written."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state, max_shard_size=MAX_SHARD_SIZE)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": split.metadata["total_size"]}, "weight_map": split.tensor_to_filename}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return sum((folder / f).stat().st_size for f in split.filename_to_tensors)


def save(model: nn.Module, tokenizer: Any, target: Path, manifest: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """Write `model` (with its compressed modules) to `target` atomically; return the full manifest."""
    state, aliases = _unique_state_dict(model)
    with atomic_dir(target, overwrite) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        tensor_bytes = write_tensors(state, tmp)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "created_by": versions(),
            **manifest,
            "modules": module_entries(model),
            "tied": aliases,
            "tensor_bytes": tensor_bytes,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return manifest


def finish_streamed(model: nn.Module, tokenizer: Any, folder: Path, layer_files: list[str], layer_names: list[str],
                    manifest: dict[str, Any]) -> dict[str, Any]:
    """Complete a checkpoint whose decoder layers were written one file each (`layer_files`, in
    `folder`) while `model` held only the rest: write the rest, the index, config, tokenizer and
    manifest. The model's layers may be on the meta device; their specs are all the manifest needs."""
    prefixes = tuple(n + "." for n in layer_names)
    state, aliases = _unique_state_dict(model)
    rest = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    save_file(rest, str(folder / "rest.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "rest.safetensors" for k in rest}
    for f in layer_files:
        with safe_open(str(folder / f), framework="pt") as handle:
            weight_map.update({k: f for k in handle.keys()})
    files = ["rest.safetensors", *layer_files]
    tensor_bytes = sum((folder / f).stat().st_size for f in files)
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": tensor_bytes}, "weight_map": weight_map},
                                                indent=2))
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    manifest = {"format": FORMAT, "version": VERSION, "created_by": versions(), **manifest,
                "modules": module_entries(model), "tied": {a: s for a, s in aliases.items() if not a.startswith(prefixes)},
                "tensor_bytes": tensor_bytes}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return manifest


def module_entries(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Format name and constructor spec of every compressed module, by module name."""
    return {
        name: {"format": type(m).__name__, "spec": m.format_spec(), "scheme": m.describe(),
               "weights": m.num_weights(), "bytes": m.storage_bytes()}
        for name, m in model.named_modules()
        if hasattr(m, "format_spec")
    }


def read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST_NAME
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise CompressError(f"{path} is not a compress checkpoint (no {MANIFEST_NAME})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompressError(f"{file} is not valid JSON ({e}); the checkpoint is corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CompressError(f"{file} is not a compress manifest (format is not '{FORMAT}')")
    if manifest.get("version") != VERSION:
        raise CompressError(
            f"{file} has manifest version {manifest.get('version')!r}; this compress reads version {VERSION}. "
            "Upgrade compress (pip install -U compress-llm) or re-create the checkpoint"
        )
    return manifest


def tensor_files(path: Path) -> list[Path]:
    """The safetensors files of a folder, checking that every file its index names exists."""
    index = path / INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CompressError(f"checkpoint {path} has no tensor file (*.safetensors)")
    for f in files:
        if not f.is_file():
            raise CompressError(f"checkpoint {path} is missing tensor file {f.name} (listed in {INDEX_NAME})")
    return files


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in tensor_files(path):
        try:
            state.update(load_file(str(f)))
        except SafetensorError as e:
            raise CompressError(f"tensor file {f} is truncated or corrupt ({e}); re-create the checkpoint") from None
    return state


def load(path: Path, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a compressed model from a checkpoint folder (on CPU, eval mode)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    manifest = read_manifest(path)
    state = read_tensors(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    for name, entry in manifest["modules"].items():
        model.set_submodule(name, format_class(entry["format"]).from_spec(entry["spec"], device="meta"))
    result = model.load_state_dict(state, strict=False, assign=True)
    for alias, source in manifest.get("tied", {}).items():
        _share(model, alias, source)
    for name, module in model.named_modules():  # modules that read another's tensors (quant/embedding.py)
        if hasattr(module, "format_spec") and hasattr(module, "link"):
            try:
                module.link(model)
            except (AttributeError, ValueError) as e:
                raise CompressError(f"checkpoint {path}: {name} cannot be linked ({e}); it is corrupt") from None
    if result.unexpected_keys:
        raise CompressError(
            f"checkpoint {path} has tensors the manifest does not account for: {', '.join(result.unexpected_keys[:3])}"
        )
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise CompressError(f"checkpoint {path} lacks tensors {', '.join(missing[:3])}; it is incomplete")
    return model.eval()


def _share(model: nn.Module, alias: str, source: str) -> None:
    """Make tensor `alias` the very tensor `source` (tied weights are stored once)."""
    owner_name, _, attr = alias.rpartition(".")
    owner = model.get_submodule(owner_name)
    tensor = model.get_parameter(source) if attr in owner._parameters else model.get_buffer(source)
    setattr(owner, attr, tensor)
