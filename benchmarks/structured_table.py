"""The structured pruning table: whole feed-forward channels, head groups or decoder layers removed
(`compress shrink`) at several budgets on one model, with the EVAL.md protocol.

Each run is its own `compress shrink` process under /usr/bin/time -v (wall time and peak resident
memory of the run itself); the base model is evaluated first, and every pruned model is scored
against it as soon as it is written: perplexity, KL, top-1, parameters, bytes on disk. Prints one
JSON line per row as it goes, then a markdown table.

    python benchmarks/structured_table.py              # smollm2-135m: channels, layers x 10/20/30%; heads; compensation
    python benchmarks/structured_table.py --rows channels:0.2 channels:0.2:compensate --out /tmp/sp
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from quant_table import evaluate_base, evaluate_checkpoint, timed_run

ROWS = ["channels:0.1:compensate", "channels:0.2:compensate", "channels:0.3:compensate", "channels:0.2",
        "layers:0.1", "layers:0.2", "layers:0.3", "heads:0.1:compensate"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", nargs="+", default=ROWS, help="unit:fraction[:compensate]")
    ap.add_argument("--out", type=Path, default=Path("out/structured_table"))
    args = ap.parse_args()

    base, reference = evaluate_base(args.model)
    results = [base]
    for spec in args.rows:
        unit, remove, *flags = spec.split(":")
        out = args.out / spec.replace(":", "-")
        cmd = [sys.executable, "-m", "compress", "shrink", args.model, "-o", str(out), "--unit", unit, "--remove",
               remove, "--overwrite", "--quiet", "--json"] + [f"--{f}" for f in flags]
        stdout, seconds, peak_mb = timed_run(cmd)
        print(f"# {spec}: {seconds:.0f} s", file=sys.stderr)
        summary = json.loads(stdout)
        fields = {"unit": unit, "requested": float(remove), "removed_fraction": summary["removed_fraction"],
                  "compensate": summary["compensate"], "shape": f"{summary['decoder_layers']} layers, "
                  f"{summary['intermediate_size']} ch, {summary['attention_heads']}/{summary['key_value_heads']} heads"}
        results.append(evaluate_checkpoint(fields, {"path": out, "run_seconds": seconds, "peak_rss_mb": peak_mb},
                                           reference))

    print("\n| unit | removed (asked) | compensated | shape | perplexity | KL vs base | top-1 | parameters "
          "| on disk | run time | peak memory |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        disk = f"{r['disk_bytes'] / 1e6:.1f} MB"
        if r.get("method") == "none":
            print(f"| uncompressed (fp32) | - | - | - | {r['perplexity']:.3f} | - | - | - | {disk} | - | - |")
            continue
        print(f"| {r['unit']} | {r['removed_fraction']:.1%} ({r['requested']:.0%}) | "
              f"{'yes' if r['compensate'] else 'no'} | {r['shape']} | {r['perplexity']:.2f} | {r['kl']:.4f} | "
              f"{r['top1'] * 100:.2f}% | {r['params_kept'] / 1e6:.1f} M | {disk} | {r['run_seconds']:.0f} s | "
              f"{r['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
