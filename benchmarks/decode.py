"""End-to-end greedy decoding speed of a Llama-2-7B-shaped model: bf16 against our int4.

A `LlamaForCausalLM` with Llama-2-7B's shapes (32 layers, hidden 4096, intermediate 11008, vocab
32000) and random bf16 weights; batch 1, a 32-token prompt, `--tokens` greedy new tokens with a
static cache, the decoding steps compiled with CUDA graphs (torch.compile, mode
"reduce-overhead"), through one or both of two harnesses (`--harness`):
  - generate: `model.generate(cache_implementation="static")`, which compiles the forward itself
              (the protocol of the peers' numbers in ../shared/bench/h100-e2e-decode.jsonl);
  - loop:     the loop a server runs (compress.static_decode.StaticDecoder, what `compress
              generate --compile` runs): the prompt through the eager forward, then one compiled
              step per token (forward and argmax in one CUDA graph), the tokens kept on the GPU
              until the end. generate's per-token Python (logits processors, stopping criteria,
              a host sync) is a fixed cost that caps what faster weights can show: on an H200
              bf16 generate took 7.5 ms a token, of which the matmuls, at the 3.2 TB/s bf16
              cuBLAS streams at M = 1 (kernels.py), take about 4.2.
tokens/s (prompt included, as generate counts it) is measured on the second call of each
harness (the first compiles). Variants:
  - bf16:          the dense model;
  - int4:          every decoder Linear RTN-quantized to 4 bits, group 128, in our QuantLinear
                   format, prepacked at load; kernel "auto" picks per shape among our Triton
                   kernels, dequantize + cuBLAS and PyTorch's tinygemm; `choices` lists what
                   it picked per (N x K, M range);
  - int4-tinygemm: the same codes and scales through PyTorch's `_weight_int4pack_mm` (the kernel
                   behind torchao's int4 weight-only path), as the peer to beat;
  - sp24:          every decoder Linear magnitude-pruned 2:4 into our SparseLinear (bf16 values),
                   prepacked at load; kernel "auto" picks per shape among our 2:4 Triton kernels,
                   decompress + cuBLAS and PyTorch's cuSPARSELt matmul;
  - sp24-int4:     every decoder Linear magnitude-pruned 2:4, its kept weights RTN-quantized to 4
                   bits (group 128) in our SparseQuantLinear format (SparseGPT's joint format),
                   through our fused 2:4 + int4 kernels or dequantize + cuBLAS, chosen per shape.
Before timing, every compressed model's logits through the chosen kernels are compared with the
reference path; with both harnesses, `loop_tokens_as_generate` counts how many of the loop's new
tokens equal generate's before the first difference (kernels that split K sum in a varying order,
so a near-tie in random logits may flip one).
One JSON line per (variant, harness) on stdout, printed as each finishes; `cudagraph_skips` counts
graphs inductor did not capture (their tokens/s are then not CUDA graphs').

    python benchmarks/decode.py                        # all variants, both harnesses
    python benchmarks/decode.py --variants bf16 int4 --harness loop --layers 4 --tokens 32
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

# Run as a script, this folder comes first on sys.path, and its kernels.py would shadow the
# `kernels` package that transformers imports where it is installed
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from compress.static_decode import StaticDecoder  # noqa: E402 (after the path fix above)

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096)


class TinyGemmLinear(nn.Module):
    """A QuantLinear's 4-bit codes and scales through PyTorch's tinygemm alone (the peer)."""

    def __init__(self, q) -> None:
        super().__init__()
        from compress.cuda import tinygemm

        self.group_size, self.in_features = q.group_size, q.in_features
        grid = q.grid()
        packed, scales_and_zeros = tinygemm.pack(q.codes(), grid.scales, grid.zeros)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from compress.cuda import tinygemm

        y = tinygemm.matmul(x.reshape(-1, self.in_features), self.packed, self.scales_and_zeros, self.group_size)
        return y.reshape(*x.shape[:-1], -1)


def build(variant: str, layers: int, group_size: int, device: str = "cuda", shape: dict = LLAMA2_7B,
          dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The model of `variant` with random weights (`shape`: LlamaConfig's sizes; the tests' are
    small)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.quant.rtn import RTNConfig

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **shape)).eval()
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None  # random weights: no token ends a sequence
    if variant == "bf16":
        return model
    linears = [(name, m) for name, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)]
    if variant == "sp24":
        from compress.sparsity.layers import SparseLinear
        from compress.sparsity.masks import nm_mask

        for name, linear in linears:
            keep = nm_mask(linear.weight.abs(), 2, 4)
            sparse = SparseLinear.from_pruned(linear.weight, keep, "2:4", None, None, name).prepack(dtype)
            model.model.layers.set_submodule(name, sparse)
        return model
    if variant == "sp24-int4":
        from compress.quant.quantize import compute_grid, quantize
        from compress.sparsity.masks import nm_mask
        from compress.sparsity.sparse_quant import SparseQuantLinear

        for name, linear in linears:
            w = linear.weight.float()
            keep = nm_mask(w.abs(), 2, 4)
            grid = compute_grid(w * keep, 4, group_size, True)
            layer = SparseQuantLinear.from_codes(quantize(w, grid), keep, grid, "2:4", 0.5, None, "float16", name)
            model.model.layers.set_submodule(name, layer.prepack(dtype))
        return model
    rtn = RTNConfig(bits=4, group_size=group_size, symmetric=True).build()
    for name, linear in linears:
        q = rtn.compress(name, linear).prepack(dtype)
        model.model.layers.set_submodule(name, q if variant == "int4" else TinyGemmLinear(q))
    return model


def check_kernels(model: nn.Module, ids: torch.Tensor) -> float:
    """Largest relative error of the logits through the chosen kernels against the reference
    path, for the prompt and for a single token (decode shapes); also measures the kernel
    choices for both shapes before any CUDA graph is captured."""
    from compress.quant.layers import QuantLinear
    from compress.sparsity.layers import SparseLinear
    from compress.sparsity.sparse_quant import SparseQuantLinear

    quant = [m for m in model.modules() if isinstance(m, (QuantLinear, SparseQuantLinear, SparseLinear))]
    errors = []
    with torch.no_grad():
        for inputs in (ids, ids[:, :1]):
            fast = model(inputs).logits.float()
            for m in quant:
                m.set_kernel("reference")
            ref = model(inputs).logits.float()
            for m in quant:
                m.set_kernel("auto")
            errors.append(((fast - ref).norm() / ref.norm()).item())
    return max(errors)


def generate(model: nn.Module, ids: torch.Tensor, tokens: int) -> torch.Tensor:
    """ids [1, P] and `tokens` greedy new ones [1, P + tokens] through `model.generate` (a static
    cache; on CUDA it compiles the decoding forward with CUDA graphs). The models of `build` have
    no EOS, so it decodes `tokens` by plain argmax, as the loop does."""
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=tokens, do_sample=False, cache_implementation="static",
                              pad_token_id=0)


def timed(run, ids: torch.Tensor, tokens: int) -> tuple[float, float, torch.Tensor]:
    """(seconds of the first, compiling call, tokens/s of the second, its output)."""
    times = []
    for _ in range(2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = run(ids)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        assert out.shape[1] == ids.shape[1] + tokens
    return times[0], tokens / times[1], out


def same_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading entries of a and b [n] are equal."""
    differ = (a != b).nonzero()
    return int(differ[0, 0]) if len(differ) else len(a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    variants = ["bf16", "int4", "int4-tinygemm", "sp24", "sp24-int4"]
    ap.add_argument("--variants", nargs="+", default=variants, choices=variants)
    ap.add_argument("--harness", nargs="+", default=["loop", "generate"], choices=["loop", "generate"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode.py needs a CUDA device")
    import transformers
    from torch._dynamo.utils import counters

    print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                      "transformers": transformers.__version__}), flush=True)
    ids = torch.randint(0, LLAMA2_7B["vocab_size"], (1, args.prompt), device="cuda")
    for variant in args.variants:
        torch._dynamo.reset()  # the compiled graphs of the last variant hold its weights
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = build(variant, args.layers, args.group_size)
        row = {"variant": variant, "layers": args.layers, "tokens": args.tokens,
               "weights_GB": round(torch.cuda.memory_allocated() / 1e9, 2)}
        torch.cuda.reset_peak_memory_stats()
        if variant == "sp24":  # the layers prepared for cuSPARSELt too (a second copy of their values)
            from compress.sparsity.layers import SparseLinear

            row["cusparselt_layers"] = sum(m._prepacked is not None and m._prepacked[2] is not None
                                           for m in model.modules() if isinstance(m, SparseLinear))
        if variant in ("int4", "sp24", "sp24-int4"):
            from compress.cuda import int_matmul as im

            row["logits_relerr_vs_reference"] = round(check_kernels(model, ids), 5)
            sp24, bits = variant.startswith("sp24"), 16 if variant == "sp24" else 4  # tuner_key: [2] bits, [9] 2:4
            row["choices"] = {f"{k[5]}x{k[6]} M<={k[7]}": name for k, name in im.TUNER.choices().items()
                              if k[9] == sp24 and k[2] == bits}
        outputs = {}
        for harness in args.harness:  # a row each, printed as it comes (a time box may end the next)
            out = dict(row, harness=harness)
            counters["inductor"].clear()
            try:  # one harness failing (a transformers version it does not know) leaves the other's number
                run = (StaticDecoder(model, args.prompt, args.tokens, dict(mode="reduce-overhead", fullgraph=True))
                       if harness == "loop" else lambda ids: generate(model, ids, args.tokens))
                first_s, tok_s, outputs[harness] = timed(run, ids, args.tokens)
                out.update(tok_s=round(tok_s, 1), warm_s=round(first_s, 1))
                del run
            except Exception as e:  # reported in the row, the traceback on stderr
                traceback.print_exc()
                out["error"] = f"{type(e).__name__}: {e}"[:300]
            # graphs inductor chose not to capture (each a reason logged): the tokens/s would not be CUDA graphs'
            out["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
            if len(outputs) == 2:
                out["loop_tokens_as_generate"] = same_prefix(outputs["loop"][0, args.prompt:],
                                                             outputs["generate"][0, args.prompt:])
            out["mem_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 1)
            print(json.dumps(out), flush=True)
        del model


if __name__ == "__main__":
    main()
