"""End-to-end greedy decoding speed of a Llama-2-7B-shaped model: bf16 against our int4.

A `LlamaForCausalLM` with Llama-2-7B's shapes (32 layers, hidden 4096, intermediate 11008, vocab
32000) and random bf16 weights; batch 1, a 32-token prompt, `--tokens` greedy new tokens through
`model.generate` with a static cache (which makes generate compile the forward with CUDA graphs).
tokens/s is measured on the second call (the first compiles). Variants:
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
reference path.
One JSON line per variant on stdout.

    python benchmarks/decode.py                        # all variants (about 4 minutes on an H100)
    python benchmarks/decode.py --variants int4 --layers 4 --tokens 32
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

# Run as a script, this folder comes first on sys.path, and its kernels.py would shadow the
# `kernels` package that transformers imports where it is installed
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

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


def build(variant: str, layers: int, group_size: int, device: str = "cuda") -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.quant.rtn import RTNConfig

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **LLAMA2_7B)).eval()
    torch.set_default_dtype(torch.float32)
    if variant == "bf16":
        return model
    linears = [(name, m) for name, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)]
    if variant == "sp24":
        from compress.sparsity.layers import SparseLinear
        from compress.sparsity.masks import nm_mask

        for name, linear in linears:
            keep = nm_mask(linear.weight.abs(), 2, 4)
            sparse = SparseLinear.from_pruned(linear.weight, keep, "2:4", None, None, name).prepack(torch.bfloat16)
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
            model.model.layers.set_submodule(name, layer.prepack(torch.bfloat16))
        return model
    rtn = RTNConfig(bits=4, group_size=group_size, symmetric=True).build()
    for name, linear in linears:
        q = rtn.compress(name, linear).prepack(torch.bfloat16)
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


def tokens_per_second(model: nn.Module, ids: torch.Tensor, tokens: int) -> tuple[float, float]:
    """(seconds of the first, compiling call, tokens/s of the second)."""
    times = []
    for _ in range(2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 cache_implementation="static", pad_token_id=0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        assert out.shape[1] == ids.shape[1] + tokens
    return times[0], tokens / times[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    variants = ["bf16", "int4", "int4-tinygemm", "sp24", "sp24-int4"]
    ap.add_argument("--variants", nargs="+", default=variants, choices=variants)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode.py needs a CUDA device")
    import transformers

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
        first_s, tok_s = tokens_per_second(model, ids, args.tokens)
        row.update(tok_s=round(tok_s, 1), warm_s=round(first_s, 1),
                   mem_GB=round(torch.cuda.max_memory_allocated() / 1e9, 1))
        print(json.dumps(row), flush=True)
        del model


if __name__ == "__main__":
    main()
