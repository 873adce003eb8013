"""Load any model argument (base model or compressed checkpoint) as a transformers model."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from . import checkpoint
from .errors import CompressError
from .models import is_checkpoint, resolve
from .progress import NullProgress, Progress

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError(f"device '{device}' requested but no CUDA device is available; use --device cpu")
    return torch.device(device)


def place(model: nn.Module, device: str) -> nn.Module:
    """Put the model on `device`. With 'auto' and several GPUs, whole decoder layers are spread
    over them by accelerate's device map (sized from each GPU's free memory), so a model larger
    than one GPU still evaluates and generates; inputs go to the first device (the embeddings')."""
    if device == "auto" and torch.cuda.device_count() > 1:
        from accelerate import dispatch_model, infer_auto_device_map

        no_split = sorted(getattr(model, "_no_split_modules", None) or [])
        return dispatch_model(model, infer_auto_device_map(model, no_split_module_classes=no_split))
    return model.to(pick_device(device))


def cast_dense(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast every float tensor outside the compressed modules (embeddings, norms, the head) to
    `dtype`; compressed modules keep their storage dtypes (e.g. fp16 scales), which a plain
    model.to(dtype) would round. Tied weights stay tied (conversion is in place)."""
    compressed = [(name, m) for name, m in model.named_modules() if hasattr(m, "format_spec")]
    for name, _ in compressed:
        model.set_submodule(name, nn.Identity())
    model.to(dtype)
    for name, module in compressed:
        model.set_submodule(name, module)
        if hasattr(module, "set_output_dtype"):  # embeddings reading a quantized head's codes
            module.set_output_dtype(dtype)
    return model


def prepare_kernels(model: nn.Module) -> nn.Module:
    """Let every compressed module derive its kernels' weight layout on the device it now sits on,
    for the model's activation dtype (that of its input embeddings): once at load time rather
    than on every call (e.g. PyTorch's packed int4 weight for bf16, cuda/ops.py)."""
    embeddings = model.get_input_embeddings()
    dtype = getattr(embeddings, "output_dtype", None) or embeddings.weight.dtype  # quant/embedding.py: no weight
    for module in model.modules():
        if hasattr(module, "prepack"):
            module.prepack(dtype)
    return model


def load_model(
    ref: str,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: Progress = NullProgress(),
) -> tuple[nn.Module, object, Path]:
    """(model in eval mode, tokenizer, resolved folder) for a model reference or checkpoint.

    Compressed modules keep their storage dtypes; `dtype` applies to the dense tensors ('auto'
    keeps what the files hold; a checkpoint's dense tensors are float32).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype != "auto" and dtype not in DTYPES:
        raise CompressError(f"unknown dtype '{dtype}'; use {', '.join(DTYPES)} or auto")
    path = resolve(ref, allow_pickle, progress)
    pick_device(device)  # a device that is not there is refused before loading
    with progress.task(f"Loading {ref}", total=None):
        if is_checkpoint(path):
            model = checkpoint.load(path, trust_remote_code)
            if dtype != "auto":
                cast_dense(model, DTYPES[dtype])
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    path, dtype="auto" if dtype == "auto" else DTYPES[dtype], trust_remote_code=trust_remote_code,
                    use_safetensors=not allow_pickle or None,
                )
            except (ValueError, OSError, SafetensorError) as e:
                raise CompressError(f"cannot load model {ref} ({path}): {str(e).splitlines()[0]}") from None
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return prepare_kernels(place(model, device)).eval(), tokenizer, path
