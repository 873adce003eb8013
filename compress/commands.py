"""Python API behind the CLI's evaluation and inspection commands."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .errors import CompressError
from .evaluate import EvalConfig, EvalResult, evaluate
from .loading import load_model
from .models import is_checkpoint, resolve
from .progress import NullProgress, Progress
from .runner import folder_tensor_bytes
from .sizes import size_report


@dataclass
class ModelEval:
    label: str
    path: Path
    result: EvalResult
    disk_bytes: int
    bits_per_weight: float | None


def eval_model(
    ref: str, base: str | None, config: EvalConfig, device: str = "cpu", trust_remote_code: bool = False,
    progress: Progress = NullProgress(), dtype: str = "float32",
) -> list[ModelEval]:
    """Evaluate `ref` (and first `base`, for KL and top-1 against it) with activations in `dtype`
    (EVAL.md's numbers use float32). One model in memory at a time."""
    out = []
    reference = None
    for label, r in ([("base", base)] if base else []) + [("model", ref)]:
        model, tokenizer, path = load_model(r, dtype, device, trust_remote_code, progress=progress)
        result, kept = evaluate(model, tokenizer, config, reference=reference, keep_reference=label == "base",
                                progress=progress, label=r)
        reference = kept if label == "base" else reference
        out.append(ModelEval(r, path, result, folder_tensor_bytes(path), size_report(model).bits_per_weight))
        del model
        gc.collect()
    return out


def info(ref: str) -> dict[str, Any]:
    """The manifest of a compressed checkpoint."""
    return checkpoint.read_manifest(resolve(ref))


def generate(ref: str, prompt: str, max_new_tokens: int, chat: bool, device: str = "cpu",
             trust_remote_code: bool = False, progress: Progress = NullProgress(),
             dtype: str = "float32", compile: bool = False) -> dict[str, Any]:
    """Greedy continuation of `prompt` (wrapped in the model's chat template if `chat`), through
    `model.generate`, or with `compile` through a static cache and a compiled step per token
    (static_decode.py: CUDA graphs on CUDA); both stop after an end-of-sequence token."""
    model, tokenizer, path = load_model(ref, dtype, device, trust_remote_code, progress=progress)
    if chat:
        if tokenizer.chat_template is None:
            raise CompressError(f"--chat: the tokenizer of {ref} has no chat template; leave out --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise CompressError("the prompt is empty once tokenized; give some text to continue")
    ids = ids.to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    steady = None
    if compile and (changed := _token_changing_settings(model.generation_config)):
        raise CompressError(f"--compile decodes by plain argmax, and the generation config of {ref} sets "
                            f"{', '.join(changed)}, which generate applies; run without --compile")
    if compile:
        with progress.task("Compiling the decoding step, then decoding", total=None):
            out, seconds, steady = _compiled_generate(model, ids, max_new_tokens)
    else:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
        seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    return {"model": ref, "compressed": is_checkpoint(path), "prompt": prompt,
            "text": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": int(new.numel()),
            "seconds": seconds, "tokens_per_s": new.numel() / seconds, "compiled": compile,
            "steady_tokens_per_s": steady}


# Generation settings under which greedy `generate` picks other tokens than the argmax (beam
# search; logits processors), compared with GenerationConfig's defaults
TOKEN_CHANGING = ("num_beams", "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "min_length",
                  "min_new_tokens", "suppress_tokens", "begin_suppress_tokens", "sequence_bias", "forced_bos_token_id",
                  "forced_eos_token_id", "exponential_decay_length_penalty", "guidance_scale")


def _token_changing_settings(config) -> list[str]:
    """"name=value" of each TOKEN_CHANGING setting of a GenerationConfig away from its default."""
    from transformers import GenerationConfig

    default = GenerationConfig()
    return [f"{name}={getattr(config, name)}" for name in TOKEN_CHANGING
            if getattr(config, name, None) != getattr(default, name, None)]


def _compiled_generate(model, ids: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, float, float | None]:
    """(prompt and new tokens [1, P + n], seconds in all, tokens/s after the steps that compile)
    through static_decode.StaticDecoder, stopping where generate would."""
    from .static_decode import StaticDecoder

    eos = model.generation_config.eos_token_id  # where generate stops too: None, one id or a list
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    decoder = StaticDecoder(model, ids.shape[1], max_new_tokens, eos=eos)
    out = decoder(ids)
    t = decoder.timing
    steady = t["steady_tokens"] / t["steady_seconds"] if t["steady_tokens"] else None
    return out, t["seconds"], steady
