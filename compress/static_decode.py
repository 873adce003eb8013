"""Greedy decoding as a server runs it: a static cache and one compiled step per token.

`model.generate` spends its own Python on every token (logits processors, stopping criteria, a
host sync): on an H200 a bf16 Llama-2-7B took 7.5 ms a token through it, about 3 ms of which were
not the matmuls, so faster compressed matmuls showed at most about 2.3x there. `StaticDecoder`
runs the prompt through the eager forward, then calls one compiled step per token (forward and
argmax; on CUDA, mode "reduce-overhead" replays it as a CUDA graph), keeps the new tokens on the
device and looks at them every `EOS_EVERY` tokens only, for an end-of-sequence token. The
compressed layers' ops are torch.library ops with fake implementations, so the whole step traces
as one graph.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable

import torch
from torch import nn

from .errors import CompressError

EOS_EVERY = 16  # new tokens between looks for an end-of-sequence token (each look waits for the device)
WARM_STEPS = 3  # steps that compile, warm up and record the CUDA graph (cudagraph trees) before it replays


def default_compile_options(device: torch.device) -> dict:
    """CUDA graphs where there is CUDA; inductor alone elsewhere (no graphs on CPU)."""
    return dict(mode="reduce-overhead" if device.type == "cuda" else "default", fullgraph=True)


class StaticDecoder:
    """Greedy decoding of `model` (a Hugging Face causal LM) for prompts of `prompt` tokens and up
    to `max_new_tokens` new ones, ending after the first token in `eos`.

    Build it once per model: its static cache, whose tensors the compiled step reads at fixed
    addresses, is reset, not replaced, between calls. After a call `timing` holds
    {"new_tokens", "seconds", "steady_tokens", "steady_seconds"}: the steady part is the steps
    after the first WARM_STEPS, which compile (once per decoder) and record the graph. (Models
    with sliding-window layers compile again once the window fills, inside the steady part.)
    Tokens are the plain argmax: none of the generation config's logits processors (repetition
    penalty and the like) apply."""

    def __init__(self, model: nn.Module, prompt: int, max_new_tokens: int, compile_options: dict | None = None,
                 eos: Iterable[int] = ()) -> None:
        from transformers import StaticCache

        if prompt < 1 or max_new_tokens < 1:
            raise ValueError(f"a static decoder needs a prompt and new tokens, not {prompt} and {max_new_tokens}")
        name = type(model).__name__
        if not getattr(model, "_can_compile_fullgraph", False):
            raise CompressError(f"compiled decoding: transformers does not compile {name} as one graph with a static "
                                "cache; decode without compiling (no --compile, eval.compile_decode: false)")
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and prompt + max_new_tokens > limit:
            raise CompressError(f"compiled decoding: a prompt of {prompt} tokens and {max_new_tokens} new ones need "
                                f"{prompt + max_new_tokens} positions, {name} has {limit}; ask for fewer new tokens")
        self.model, self.prompt, self.max_new_tokens, self.eos = model, prompt, max_new_tokens, sorted(set(eos))
        self.cache = StaticCache(config=model.config, max_cache_len=prompt + max_new_tokens)
        params = inspect.signature(type(model).forward).parameters
        # transformers 5.25 names the cache "cache" (5.17: past_key_values); in both the cache
        # counts its tokens itself, while 4.56's forward takes cache_position and writes there
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.takes_cache_position = "cache_position" in params
        device = next(model.parameters()).device
        self.step = torch.compile(self._step, **(compile_options or default_compile_options(device)))
        self.timing: dict[str, float] = {}

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids [1, n] at positions [n] of the cache -> logits [1, n, vocab]."""
        extra = {"cache_position": positions} if self.takes_cache_position else {}
        return self.model(input_ids=ids, position_ids=positions[None], use_cache=True,
                          **{self.cache_arg: self.cache}, **extra).logits

    def _step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """token [1, 1] at cache position [1] -> the next token [1, 1]."""
        return self._forward(token, position)[:, -1].argmax(-1, keepdim=True)

    def _compiled_step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """`step`, whose first call compiles; a forward that does not compile as one graph (or a
        compiler that fails on it) is one clear error."""
        from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException

        try:
            return self.step(token, position)
        except (TorchDynamoException, FailOnRecompileLimitHit) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            why = " ".join(lines[:2])[:200] or type(e).__name__  # what failed and why; then dynamo's boilerplate
            raise CompressError(f"compiled decoding: the forward of this {type(self.model).__name__} failed to compile "
                                f"as one graph ({why}); decode without compiling (no --compile, "
                                "eval.compile_decode: false)") from None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [1, P] (P = `prompt`) -> [1, P + n]: the prompt and n <= max_new_tokens new tokens,
        the last of them the first end-of-sequence token if one came."""
        if ids.shape != (1, self.prompt):
            raise ValueError(f"this decoder was built for a prompt of shape (1, {self.prompt}), "
                             f"got {tuple(ids.shape)}")
        p, device = self.prompt, ids.device
        self.cache.reset()
        out = torch.empty(1, p + self.max_new_tokens, dtype=ids.dtype, device=device)
        out[:, :p] = ids
        eos = torch.tensor(self.eos, dtype=ids.dtype, device=device)
        _sync(device)
        start = warm = time.perf_counter()
        steps = 0  # calls of the compiled step
        with torch.no_grad():
            token = self._forward(ids, torch.arange(p, device=device))[:, -1].argmax(-1, keepdim=True)
            out[:, p] = token[:, 0]
            position = torch.tensor([p], device=device)
            for i in range(1, self.max_new_tokens):  # i new tokens so far
                if i % EOS_EVERY == 0 and _first_eos(out[0, p:p + i], eos) is not None:
                    break
                torch.compiler.cudagraph_mark_step_begin()  # the last step's output was consumed
                token = self._compiled_step(token, position).clone()  # a graph's output: overwritten by the next replay
                out[:, p + i] = token[:, 0]
                position += 1
                steps += 1
                if steps == WARM_STEPS:
                    _sync(device)
                    warm = time.perf_counter()
        ended = _first_eos(out[0, p:p + 1 + steps], eos)
        n = 1 + steps if ended is None else ended + 1
        _sync(device)
        end = time.perf_counter()
        steady = max(steps - WARM_STEPS, 0)
        self.timing = {"new_tokens": n, "seconds": end - start, "steady_tokens": steady,
                       "steady_seconds": end - warm if steady else 0.0}
        return out[:, :p + n]


def _first_eos(tokens: torch.Tensor, eos: torch.Tensor) -> int | None:
    """Index of the first token of `tokens` [n] in `eos` [e] (a look that waits for the device)."""
    if not eos.numel():
        return None
    hits = torch.isin(tokens, eos).nonzero()
    return int(hits[0, 0]) if len(hits) else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
