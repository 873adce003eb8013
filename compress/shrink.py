"""`compress shrink`: structured pruning (sparsity/structured.py) from a model reference to a
smaller plain Hugging Face model folder, checked before it is written.

The steps: load the model (in memory, whole: structured pruning changes shapes, which the
layer-by-layer engine does not stream), one calibration pass for the statistics, plan, remove,
then check the effect: the decoder layers' weights shrank by exactly the planned count, and the
saved folder, reloaded by plain `AutoModelForCausalLM.from_pretrained`, gives the logits of the
pruned model in memory. Only then does the folder appear (atomically); the input is never touched.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from compress.sparsity import structured

from .data import load_text, token_windows
from .errors import CompressError
from .fsutil import atomic_dir, check_output
from .loading import load_model
from .models import is_checkpoint, resolve
from .progress import NullProgress, Progress

SUMMARY_FILE = "structured_pruning.json"  # what was removed, written beside the model files


def shrink(ref: str, output: str, unit: str, remove: float, compensate: bool = False, data: str = "news",
           samples: int = 64, seq_len: int = 512, batch_size: int = 8, device: str = "cpu",
           trust_remote_code: bool = False, overwrite: bool = False,
           progress: Progress = NullProgress()) -> dict[str, Any]:
    """Remove about `remove` of the decoder layers' parameters as whole `unit`s (channels, heads or
    layers) and write the smaller model to `output`; `compensate` folds the removed units' mean
    output into a bias (off by default: on smollm2-135m it did not help, README). Returns the
    summary that is also saved in the folder."""
    structured.check_request(unit, remove, compensate)
    if samples < 1 or seq_len < 2:
        raise CompressError(f"--samples must be at least 1 and the sequence length at least 2 "
                            f"(got {samples}, {seq_len})")
    target = Path(output)
    check_output(target, overwrite)
    if is_checkpoint(resolve(ref, progress=progress)):
        raise CompressError(f"{ref} is a compressed checkpoint; structured pruning takes an uncompressed model")
    start = time.perf_counter()
    model, tokenizer, _ = load_model(ref, "auto", device, trust_remote_code, progress=progress)
    layers = structured.decoder_layers(model)
    windows = token_windows(tokenizer, load_text(data), samples, seq_len, f"calibration data '{data}'")
    stats = structured.collect_stats(model, windows, batch_size, progress)
    plan = structured.plan(model, stats, unit, remove, compensate)
    before = _layer_weights(layers)
    total_before = sum(p.numel() for p in model.parameters())
    structured.apply(model, plan, stats)
    after = _layer_weights(structured.decoder_layers(model))
    if before - after != plan.params_removed:
        raise CompressError(f"structured pruning removed {before - after} decoder weights where "
                            f"{plan.params_removed} were planned; nothing was written")
    probe = windows[:1].to(next(model.parameters()).device)
    with torch.no_grad():
        expected = model(probe, use_cache=False).logits
    summary = {
        "model": ref, "unit": unit, "remove_requested": remove, "removed_fraction": round(plan.fraction, 5),
        "compensate": plan.compensate, "calibration": {"data": data, "samples": samples, "seq_len": seq_len},
        "params_before": total_before, "params_after": sum(p.numel() for p in model.parameters()),
        "decoder_layers": len(structured.decoder_layers(model)),
        "intermediate_size": model.config.intermediate_size,
        "attention_heads": model.config.num_attention_heads,
        "key_value_heads": getattr(model.config, "num_key_value_heads", model.config.num_attention_heads),
        "removed": plan.removed,
    }
    with atomic_dir(target, overwrite) as tmp:
        with progress.task(f"Writing {target}", total=None):
            try:
                model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
            except Exception as e:  # transformers' config validation raises plain Exceptions
                raise CompressError(f"transformers refused to save the pruned model: {str(e).splitlines()[0]}; "
                                    "nothing was written") from None
        _check_reload(tmp, probe, expected, next(model.parameters()).dtype, trust_remote_code)
        summary["seconds"] = round(time.perf_counter() - start, 1)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    summary["output"] = str(target)
    return summary


def _layer_weights(layers: torch.nn.ModuleList) -> int:
    """Weights (not biases or norms) of the decoder layers' Linear modules."""
    return sum(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear))


def _check_reload(folder: Path, probe: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                  trust_remote_code: bool) -> None:
    """The saved folder loads in plain transformers and computes the in-memory logits."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except Exception as e:  # config validation, size mismatches: all mean the folder is not loadable
        raise CompressError(f"the pruned model does not reload in transformers: {str(e).splitlines()[0]}; "
                            "nothing was written") from None
    model.to(expected.device).eval()
    with torch.no_grad():
        got = model(probe, use_cache=False).logits
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else "shape"
        raise CompressError(f"the pruned model saved by transformers does not reload to the same logits "
                            f"(max difference {diff}); nothing was written")
