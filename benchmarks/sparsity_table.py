"""The sparsity quality table: every pruning method x pattern on one model, with the EVAL.md protocol.

Each pruning runs as its own `compress prune` process under /usr/bin/time -v (wall time and peak
resident memory of the run itself); then the base model is evaluated once and every checkpoint is
scored against it: perplexity, KL, top-1, bits per weight, bytes on disk, weights kept. Prints one
JSON line per row, then a markdown table.

    python benchmarks/sparsity_table.py                      # smollm2-135m: magnitude/wanda/sparsegpt x 50%, 2:4, 4:8
    python benchmarks/sparsity_table.py --methods wanda --patterns 2:4 --out /tmp/st
    python benchmarks/sparsity_table.py --methods --patterns 2:4 --bits 4   # SparseGPT 2:4 + 4-bit, joint and separate
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quant_table import evaluate_checkpoints, timed_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="*", default=["magnitude", "wanda", "sparsegpt"])
    ap.add_argument("--patterns", nargs="+", default=["unstructured", "2:4", "4:8"])
    ap.add_argument("--sparsity", type=float, default=0.5, help="for the unstructured rows")
    ap.add_argument("--bits", type=int, help="add SparseGPT rows that also quantize the kept weights to this many "
                    "bits, for every pattern: joint (one pass) and separate (prune, then quantize)")
    ap.add_argument("--group-size", type=int, default=128, help="with --bits")
    ap.add_argument("--out", type=Path, default=Path("out/sparsity_table"))
    args = ap.parse_args()

    rows = [(method, pattern, None) for pattern in args.patterns for method in args.methods]
    if args.bits:
        rows += [("sparsegpt", pattern, mode) for pattern in args.patterns for mode in ("joint", "separate")]
    runs = {}
    for method, pattern, mode in rows:
        out = args.out / f"{method}-{pattern.replace(':', 'of')}{f'-w{args.bits}-{mode}' if mode else ''}"
        cmd = [sys.executable, "-m", "compress", "prune", args.model, "-o", str(out), "--method", method,
               "--pattern", pattern, "--overwrite", "--quiet", "--json"]
        if pattern == "unstructured":
            cmd += ["--sparsity", str(args.sparsity)]
        label = f"{args.sparsity:.0%}" if pattern == "unstructured" else pattern
        if mode:
            cmd += ["--bits", str(args.bits), "--group-size", str(args.group_size), f"--{mode}"]
            label += f" + {args.bits}-bit g{args.group_size} ({mode})"
        _, seconds, peak_mb = timed_run(cmd)
        runs[(method, pattern, mode)] = ({"method": method, "pattern": label},
                                         {"path": out, "run_seconds": seconds, "peak_rss_mb": peak_mb})
        print(f"# pruned {method} {label}: {seconds:.0f} s", file=sys.stderr)

    results = evaluate_checkpoints(args.model, runs)
    print("\n| method | pattern | perplexity | KL vs base | top-1 | weights kept | on disk | bits/weight | run time "
          "| peak memory |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        disk = f"{r['disk_bytes'] / 1e6:.1f} MB"
        if r["method"] == "none":
            print(f"| uncompressed (fp32) | - | {r['perplexity']:.3f} | - | - | - | {disk} | 32 | - | - |")
            continue
        print(f"| {r['method']} | {r['pattern']} | {r['perplexity']:.3f} | {r['kl']:.4f} | {r['top1'] * 100:.2f}% | "
              f"{r['params_kept'] / 1e6:.1f} M | {disk} | {r['bits_per_weight']:.3f} | {r['run_seconds']:.0f} s | "
              f"{r['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
