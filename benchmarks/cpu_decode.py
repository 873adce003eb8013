"""Greedy decode and prefill speed of smollm2-135m on CPU: the float model against its compressed
layers through the C++ CPU kernels ("auto": cuda/cpu_fused.py for decode, cuda/cpu_dequantize.py
for prefill) and through the reference path, in one run.

Variants (every decoder Linear; `lm_head` and embeddings stay float):
  - float:      the model as loaded;
  - int4-g128:  RTN 4-bit, group 128, symmetric (QuantLinear);
  - int4-g64:   the same in groups of 64, which PyTorch's packed int4 CPU matmul takes (K = 576
                is not a multiple of 128): the path bf16 activations run;
  - sp24:       magnitude 2:4 mask, the kept weights as they are (SparseLinear, what magnitude,
                Wanda and SparseGPT 2:4 write);
  - sp24-int4:  magnitude 2:4 mask, the kept weights RTN 4-bit group 128 (SparseQuantLinear, the
                format SparseGPT with `--bits 4` writes; a speed check, the codes are not tuned).
Each compressed variant runs with kernel "auto" and "reference". `tokens_per_s`: `--tokens`
greedy tokens after a 16-token prompt; `prefill_tokens_per_s`: one forward pass over a
`--prefill`-token prompt; each the median of `--repeats` runs after one warm-up run (which builds
the kernels). With `--compile`, decoding runs with a static cache and `generate`'s compilation
(inductor on CPU too), the ops in the compiled graph; prefill stays eager. One JSON line per
(variant, kernel) on stdout.

    python benchmarks/cpu_decode.py
    python benchmarks/cpu_decode.py --dtype bfloat16 --variants float int4-g64
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

# Run as a script, this folder comes first on sys.path, and its kernels.py would shadow the
# `kernels` package that transformers imports where it is installed
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

VARIANTS = ("float", "int4-g128", "int4-g64", "sp24", "sp24-int4")


def compress_linears(model: nn.Module, variant: str) -> list[nn.Module]:
    """Replace every decoder Linear by `variant`'s compressed module (prepacked); the new modules."""
    from compress.quant.quantize import compute_grid, quantize
    from compress.quant.rtn import RTNConfig
    from compress.sparsity.layers import SparseLinear
    from compress.sparsity.masks import nm_mask
    from compress.sparsity.sparse_quant import SparseQuantLinear

    out = []
    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            w = child.weight.detach().float()
            keep = nm_mask(w.abs(), 2, 4)
            if variant.startswith("int4-g"):
                q = RTNConfig(bits=4, group_size=int(variant.removeprefix("int4-g"))).build().compress(name, child)
            elif variant == "sp24":
                q = SparseLinear.from_pruned(child.weight.detach(), keep, "2:4", None, child.bias, name)
            else:
                grid = compute_grid(w * keep, 4, 128, True)
                q = SparseQuantLinear.from_codes(quantize(w, grid), keep, grid, "2:4", 0.5, child.bias, "float16", name)
            setattr(parent, name, q)
            out.append(q)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="decode with a static cache, compiled")
    args = parser.parse_args()

    import compress

    dtype = getattr(torch, args.dtype)
    prompt = torch.randint(100, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"

    long_prompt = torch.randint(100, 1000, (1, args.prefill), generator=torch.Generator().manual_seed(1))

    def rate(run, tokens: int) -> float:
        """Median tokens/s of `run()` over --repeats calls after a warm-up call."""
        runs = []
        for _ in range(args.repeats + 1):
            t = time.perf_counter()
            run()
            runs.append(tokens / (time.perf_counter() - t))
        return statistics.median(runs[1:])

    compiled = {}
    if args.compile:
        from transformers.generation.configuration_utils import CompileConfig

        config = CompileConfig()
        config._compile_all_devices = True  # generate compiles only on CUDA unless told
        compiled = {"cache_implementation": "static", "compile_config": config}

    def tokens_per_s(model: nn.Module) -> float:
        return rate(lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.tokens,
                                           min_new_tokens=args.tokens, do_sample=False, pad_token_id=0, **compiled),
                    args.tokens)

    @torch.no_grad()
    def prefill_tokens_per_s(model: nn.Module) -> float:
        return rate(lambda: model(long_prompt), args.prefill)

    for variant in args.variants:
        model = compress.load("smollm2-135m", dtype=args.dtype)
        layers = [] if variant == "float" else compress_linears(model, variant)
        for layer in layers:
            layer.prepack(dtype)
        for kernel in ("auto",) if variant == "float" else ("auto", "reference"):
            for layer in layers:
                layer.set_kernel(kernel)
            if args.compile:
                torch._dynamo.reset()  # each (variant, kernel) compiles afresh, within dynamo's recompile limit
            print(json.dumps({"variant": variant, "kernel": kernel, "dtype": args.dtype, "cpu": cpu,
                              "compiled": args.compile,
                              "tokens_per_s": round(tokens_per_s(model), 2),
                              "prefill_tokens_per_s": round(prefill_tokens_per_s(model), 1)}), flush=True)


if __name__ == "__main__":
    main()
