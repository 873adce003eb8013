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


def load_model(
    ref: str,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: Progress = NullProgress(),
) -> tuple[nn.Module, object, Path]:
    """(model in eval mode, tokenizer, resolved folder) for a model reference or checkpoint.

    Compressed modules keep their storage dtypes; `dtype` applies to the dense tensors of a base
    model ('auto' keeps what the files hold).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(ref, allow_pickle, progress)
    pick_device(device)  # a device that is not there is refused before loading
    with progress.task(f"Loading {ref}", total=None):
        if is_checkpoint(path):
            model = checkpoint.load(path, trust_remote_code)
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    path, dtype="auto" if dtype == "auto" else DTYPES[dtype], trust_remote_code=trust_remote_code,
                    use_safetensors=not allow_pickle or None,
                )
            except (ValueError, OSError, SafetensorError) as e:
                raise CompressError(f"cannot load model {ref} ({path}): {str(e).splitlines()[0]}") from None
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return place(model, device).eval(), tokenizer, path
