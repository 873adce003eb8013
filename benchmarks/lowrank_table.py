"""The low-rank quality table: every decomposition x rank allocation x budget on one model, with
the EVAL.md protocol.

Each decomposition runs as its own `compress lowrank` process (or `compress run` for pipeline
files) under /usr/bin/time -v (wall time and peak resident memory of the run itself); then the
base model is evaluated first, and every checkpoint is scored against it as soon as it is written:
perplexity, KL, top-1, weights kept, bytes on disk. Prints one JSON line per row as it goes, then
a markdown table.

    python benchmarks/lowrank_table.py        # smollm2-135m: svd/asvd/svd_llm x uniform/sensitivity x 10/20/30%
    python benchmarks/lowrank_table.py --methods svd_llm --allocations energy --removed 0.2 --out /tmp/lt
    python benchmarks/lowrank_table.py --methods --pipelines examples/smollm2-svdllm-gptq.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quant_table import evaluate_base, evaluate_checkpoint, timed_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="*", default=["svd", "asvd", "svd_llm"])
    ap.add_argument("--allocations", nargs="+", default=["uniform", "sensitivity"])
    ap.add_argument("--removed", nargs="+", type=float, default=[0.1, 0.2, 0.3],
                    help="fractions of the targeted parameters removed")
    ap.add_argument("--pipelines", nargs="*", default=[], type=Path, help="pipeline files to add as rows")
    ap.add_argument("--out", type=Path, default=Path("out/lowrank_table"))
    args = ap.parse_args()

    base, reference = evaluate_base(args.model)
    results = [base]

    def row(fields: dict, cmd: list[str], out: Path) -> None:
        _, seconds, peak_mb = timed_run(cmd)
        print(f"# {fields}: {seconds:.0f} s", file=sys.stderr)
        results.append(evaluate_checkpoint(fields, {"path": out, "run_seconds": seconds, "peak_rss_mb": peak_mb},
                                           reference))

    for pipeline in args.pipelines:
        out = args.out / pipeline.stem
        row({"method": pipeline.stem, "setting": "pipeline"},
            [sys.executable, "-m", "compress", "run", str(pipeline), "-o", str(out), "--set", "eval=null",
             "--overwrite", "--quiet", "--json"], out)
    for removed in args.removed:
        for allocation in args.allocations:
            for method in args.methods:
                out = args.out / f"{method}-{allocation}-{round(removed * 100)}"
                row({"method": method, "setting": f"{removed:.0%} {allocation}"},
                    [sys.executable, "-m", "compress", "lowrank", args.model, "-o", str(out), "--method", method,
                     "--keep", f"{1 - removed:g}", "--allocation", allocation, "--overwrite", "--quiet", "--json"], out)

    print("\n| method | removed, ranks | perplexity | KL vs base | top-1 | weights kept | on disk | run time "
          "| peak memory |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        disk = f"{r['disk_bytes'] / 1e6:.1f} MB"
        if r["method"] == "none":
            print(f"| uncompressed (fp32) | - | {r['perplexity']:.3f} | - | - | - | {disk} | - | - |")
            continue
        print(f"| {r['method']} | {r['setting']} | {r['perplexity']:.2f} | {r['kl']:.4f} | {r['top1'] * 100:.2f}% | "
              f"{r['params_kept'] / 1e6:.1f} M | {disk} | {r['run_seconds']:.0f} s | {r['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
