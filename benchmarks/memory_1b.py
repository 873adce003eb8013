"""Peak memory of streamed GPTQ on a ~1B-parameter Llama (random weights), on this machine.

Builds (once) a randomly initialised Llama-architecture model of about 1.2B parameters in float32
(hidden 2048, intermediate 5632, 22 layers, 32 query / 4 key-value heads, SmolLM2's tokenizer and
vocabulary, untied head: about 4.7 GB of safetensors), then runs

    compress quantize MODEL -o OUT --method gptq --bits 4 --group-size 128

under /usr/bin/time -v and prints the peak resident memory and wall time as JSON. The goal is a
peak of at most 2 GB whatever the number of layers: only one layer's weights, the tensors outside
the layers, the Hessians of one layer and the calibration activations are ever in memory.

    python benchmarks/memory_1b.py --samples 64      # the protocol's calibration set (slow on 2 cores)
    python benchmarks/memory_1b.py --samples 16      # same memory shape, a quarter of the compute
    python benchmarks/memory_1b.py --offload disk    # activations on disk between layers
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/ is not a package
from quant_table import timed_run  # noqa: E402


def build(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from compress.models import prepare

    tokenizer = AutoTokenizer.from_pretrained(prepare("smollm2-135m"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    print(f"# built {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters", file=sys.stderr)
    model.save_pretrained(folder, max_shard_size="1GB")
    tokenizer.save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "compress-llama-1b")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8, help="Calibration samples per layer call.")
    ap.add_argument("--offload", choices=["cpu", "disk"], default="cpu",
                    help="Where activations wait between layers (disk: only the batch in flight in memory).")
    args = ap.parse_args()
    if not (args.model_dir / "config.json").is_file():
        build(args.model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = Path(tmp) / "p.yaml"
        pipeline.write_text(json.dumps({
            "model": str(args.model_dir), "eval": None, "output": str(Path(tmp) / "out"),
            "calibration": {"samples": args.samples, "seq_len": args.seq_len, "offload": args.offload,
                            "batch_size": args.batch_size},
            "steps": [{"method": "gptq", "bits": 4, "group_size": 128}]}))
        cmd = [sys.executable, "-m", "compress", "run", str(pipeline), "--quiet", "--json"]
        stdout, seconds, peak_mb = timed_run(cmd)
        result = json.loads(stdout)
        print(json.dumps({"model_gb_fp32": result["base"]["tensor_bytes"] / 1e9, "samples": args.samples,
                          "seq_len": args.seq_len, "offload": args.offload, "batch_size": args.batch_size,
                          "peak_rss_gb": peak_mb / 1024, "wall_seconds": seconds,
                          "bits_per_weight": result["compressed"]["bits_per_weight"]}))


if __name__ == "__main__":
    main()
