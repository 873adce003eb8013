"""The llm-compressor side of benchmarks/peers.py; runs with benchmarks/.venv-peers/bin/python.

Loads a Hugging Face model folder in float32 on CPU, quantizes its Linear layers (lm_head left
alone) with llm-compressor's `oneshot` — GPTQModifier for `gptq`, QuantizationModifier (no
calibration data: the data-free pipeline) for `rtn` — on calibration token ids read from a file
(a long tensor [samples, seq_len] written with torch.save), and writes the result as a plain
Hugging Face folder of dense float32 weights that any transformers can load.

Why not llm-compressor's own `save_pretrained(save_compressed=False)`: that writes a
compressed-tensors "dense" checkpoint (the original weights where a module was not rewritten, plus
weight_scale / weight_zero_point tensors and a `quantization_config` with quant_method
compressed-tensors), which needs compressed-tensors to load and fake-quantizes at every forward.
Instead each quantized module's weight is replaced by exactly what compressed-tensors' forward
computes from it (`forward_quantize`, the runtime fake-quantization), and the tensors are saved
under the base folder's own names beside its config and tokenizer files.

    benchmarks/.venv-peers/bin/python benchmarks/peers_worker.py MODEL_DIR CALIB.pt OUT_DIR \
        --method gptq --bits 4 --group-size 64

Prints one JSON line on stdout (versions, modules quantized, seconds in oneshot and in saving).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import sys
import time
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")


PRUNERS = ("sparsegpt", "wanda", "magnitude", "sparsegpt+gptq")


def build_recipe(method: str, bits: int, group_size: int, damp: float, pattern: str = "unstructured"):
    """llm-compressor's modifiers for one scheme: pruning at its defaults (half the weights), GPTQ
    or RTN on a symmetric group-wise int grid, or SparseGPT then GPTQ (its documented way to a
    2:4 + 4-bit model)."""
    structure = "0:0" if pattern == "unstructured" else pattern  # their N:M keeps N of every M
    if method in ("sparsegpt", "wanda"):
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
        from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

        kind = SparseGPTModifier if method == "sparsegpt" else WandaPruningModifier
        return kind(sparsity=0.5, mask_structure=structure, targets=["Linear"], ignore=["lm_head"])
    if method == "magnitude":  # one-shot: start and end at step 0; its masks know "unstructured", not "0:0"
        from llmcompressor.modifiers.pruning.magnitude import MagnitudePruningModifier

        return MagnitudePruningModifier(targets=["re:.*_proj$"], init_sparsity=0.5, final_sparsity=0.5,
                                        mask_structure=pattern, start=0, end=0, update=1)
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if method in ("gptq", "sparsegpt+gptq"):
        from llmcompressor.modifiers.gptq import GPTQModifier

        # block_size and actorder are llm-compressor's defaults (128, "static" = weight order:
        # columns processed by decreasing diag(H), groups kept contiguous), written out.
        gptq = GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=damp, block_size=128,
                            actorder="static")
        if method == "gptq":
            return gptq
        return [build_recipe("sparsegpt", bits, group_size, damp, pattern), gptq]
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return QuantizationModifier(config_groups=groups, ignore=["lm_head"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="Hugging Face model folder (safetensors + config + tokenizer).")
    ap.add_argument("calibration", type=Path, help="torch.save'd long tensor [samples, seq_len] (gptq only).")
    ap.add_argument("out", type=Path)
    ap.add_argument("--method", choices=("gptq", "rtn", *PRUNERS), default="gptq")
    ap.add_argument("--pattern", default="unstructured", help="For pruning: unstructured (50%%) or N:M.")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening_frac (fraction of mean diag(H)).")
    args = ap.parse_args()

    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    kwargs = {}
    if args.method not in ("rtn", "magnitude"):  # the data-free ones
        ids = torch.load(args.calibration, weights_only=True)
        if ids.dtype != torch.long or ids.dim() != 2:
            raise SystemExit(f"{args.calibration}: expected a long tensor [samples, seq_len], got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        # Pre-tokenized: llm-compressor skips its own tokenization for a dataset with input_ids.
        # Every sample has the same length, so no truncation or padding; not shuffled (the
        # Hessians are sums over all samples, so their order does not matter anyway).
        kwargs = dict(dataset=Dataset.from_dict({"input_ids": ids.tolist()}), num_calibration_samples=len(ids),
                      max_seq_length=ids.shape[1], shuffle_calibration_samples=False, batch_size=1)

    start = time.perf_counter()
    recipe = build_recipe(args.method, args.bits, args.group_size, args.damp, args.pattern)
    model = oneshot(model=model, recipe=recipe, **kwargs)
    oneshot_seconds = time.perf_counter() - start

    start = time.perf_counter()
    quantized = []
    with torch.no_grad():
        for name, module in model.named_modules():
            # pruned weights are already in place (peers.py measures the sparsity both sides reach)
            if args.method in PRUNERS and args.method != "sparsegpt+gptq":
                if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                    quantized.append(name)
                continue
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            module.weight.data = forward_quantize(module, module.weight.data, "weight", scheme.weights)
            quantized.append(name)
    if not quantized or any(n == "lm_head" or n.endswith(".lm_head") for n in quantized):
        raise SystemExit(f"unexpected set of quantized modules: {quantized[:5]}... ({len(quantized)})")
    state = model.state_dict()
    src = next(iter(sorted(args.model.glob("*.safetensors"))), None)
    if src is None or len(list(args.model.glob("*.safetensors"))) != 1:
        raise SystemExit(f"{args.model}: expected exactly one .safetensors file")
    with safe_open(src, "pt") as f:
        names = list(f.keys())
    missing = [n for n in names if n not in state]
    if missing:
        raise SystemExit(f"tensors of {src.name} missing from the quantized model: {missing[:5]}")
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({n: state[n].detach().to(torch.float32).contiguous() for n in names}, str(args.out / src.name),
              metadata={"format": "pt"})
    shutil.copy2(args.model / "config.json", args.out / "config.json")
    for fname in TOKENIZER_FILES:
        if (args.model / fname).is_file():
            shutil.copy2(args.model / fname, args.out / fname)
    save_seconds = time.perf_counter() - start

    versions = {p: importlib.metadata.version(p)
                for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")}
    print(json.dumps({"versions": versions, "modules_quantized": len(quantized), "oneshot_seconds": oneshot_seconds,
                      "save_seconds": save_seconds, "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
