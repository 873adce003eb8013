"""The evaluation protocol of ../shared/EVAL.md.

- Perplexity: `windows` non-overlapping windows of `seq_len` tokens of the eval text;
  ppl = exp(mean next-token NLL over all predicted tokens).
- Fidelity: on the first `fidelity_windows` windows, mean KL(base || model) of the next-token
  distributions and top-1 agreement, against a reference taken from the base model first.
- Speed: prefill tokens/s of one `seq_len` sequence and greedy decode tokens/s of `new_tokens`
  tokens, median of `repeats` runs, on the device the model is on; decoding through
  `model.generate`, or with `compile_decode` through static_decode.StaticDecoder (a static cache
  and a compiled step per token, CUDA graphs on CUDA) after one untimed call that compiles.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .data import load_text, token_windows
from .progress import NullProgress, Progress


class EvalConfig(BaseModel):
    """The `eval:` section of a pipeline (defaults are the protocol's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str = Field("wiki", description="Evaluation text: wiki, news, a text file or folder, or hf:<dataset>.")
    split: str = Field("test", description="Split of an hf: dataset.")
    text_field: str = Field("text", description="Text column of an hf: dataset.")
    windows: int = Field(64, ge=1, description="Number of perplexity windows.")
    seq_len: int = Field(512, ge=2, description="Tokens per window.")
    fidelity_windows: int = Field(8, ge=0, description="Windows (the first ones) scored for KL and top-1 agreement.")
    speed: bool = Field(True, description="Measure prefill and decode tokens/s.")
    new_tokens: int = Field(64, ge=1, description="Tokens generated per decode-speed run.")
    repeats: int = Field(3, ge=1, description="Speed runs; the median is reported.")
    compile_decode: bool = Field(False, description="Time decoding with a static cache and a compiled step per "
                                 "token (CUDA graphs on CUDA), after one untimed call that compiles.")


@dataclass
class Reference:
    """The base model's next-token log-probabilities on the fidelity windows: [fid, seq_len-1, vocab]."""

    logprobs: list[torch.Tensor] = field(default_factory=list)


@dataclass
class EvalResult:
    perplexity: float
    scored_tokens: int
    kl: float | None = None
    top1: float | None = None
    prefill_tps: float | None = None
    decode_tps: float | None = None
    decode_compiled: bool = False  # decode_tps measured through a compiled step (EvalConfig.compile_decode)
    eval_seconds: float = 0.0
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)


def eval_windows(tokenizer, config: EvalConfig) -> torch.Tensor:
    text = load_text(config.data, config.split, config.text_field)
    return token_windows(tokenizer, text, config.windows, config.seq_len, f"evaluation data '{config.data}'")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer,
    config: EvalConfig,
    reference: Reference | None = None,
    keep_reference: bool = False,
    progress: Progress = NullProgress(),
    label: str = "model",
) -> tuple[EvalResult, Reference | None]:
    """Score `model` on the protocol; compare with `reference` if given, or record one if asked."""
    start = time.perf_counter()
    device = next(model.parameters()).device
    windows = eval_windows(tokenizer, config).to(device)  # [windows, seq_len]
    fid = min(config.fidelity_windows, config.windows)
    kept = Reference() if keep_reference else None
    nll_sum, count, kl_sum, agree, fid_count = 0.0, 0, 0.0, 0, 0
    with progress.task(f"Evaluating {label}", total=config.windows) as advance:
        for i, window in enumerate(windows):
            # [seq_len-1, vocab]; .to(device): a model spread over GPUs returns them on its last one
            logits = model(input_ids=window[None]).logits[0, :-1].float().to(device)
            logp = torch.log_softmax(logits, dim=-1)
            targets = window[1:]
            nll_sum -= logp.gather(1, targets[:, None]).sum().item()
            count += targets.numel()
            if i < fid:
                if kept is not None:
                    kept.logprobs.append(logp.cpu())
                if reference is not None:
                    ref = reference.logprobs[i].to(device)  # [seq_len-1, vocab]
                    kl_sum += (ref.exp() * (ref - logp)).sum().item()
                    agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
                    fid_count += targets.numel()
            advance(1)
    result = EvalResult(perplexity=math.exp(nll_sum / count), scored_tokens=count, device=_device_name(device))
    if reference is not None and fid_count:
        result.kl, result.top1 = kl_sum / fid_count, agree / fid_count
    if config.speed:
        result.prefill_tps, result.decode_tps = measure_speed(model, tokenizer, windows[0], config, progress, label)
        result.decode_compiled = config.compile_decode
    result.eval_seconds = time.perf_counter() - start
    return result, kept


@torch.no_grad()
def measure_speed(model: nn.Module, tokenizer, window: torch.Tensor, config: EvalConfig, progress: Progress,
                  label: str) -> tuple[float, float]:
    """(prefill tokens/s on `window`, greedy decode tokens/s of `new_tokens` after a 16-token prompt)."""
    prefill, decode = [], []
    prompt = window[None, :16]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if config.compile_decode:
        from .static_decode import StaticDecoder

        decoder = StaticDecoder(model, prompt.shape[1], config.new_tokens)  # no EOS: new_tokens each time
        with progress.task(f"Compiling the decoding step of {label}", total=None):
            decoder(prompt)

        def run_decode():
            return decoder(prompt)
    else:
        def run_decode():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=config.new_tokens,
                                  min_new_tokens=config.new_tokens, do_sample=False, pad_token_id=pad)
    with progress.task(f"Timing {label}", total=config.repeats) as advance:
        for _ in range(config.repeats):
            t = _timed(lambda: model(input_ids=window[None]), window.device)
            prefill.append(window.numel() / t)
            decode.append(config.new_tokens / _timed(run_decode, window.device))
            advance(1)
    return statistics.median(prefill), statistics.median(decode)


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
