"""The quantization quality table: every method x bits on one model, with the EVAL.md protocol.

Each compression runs as its own `compress quantize` process under /usr/bin/time -v (wall time
and peak resident memory of the run itself); then the base model is evaluated once (keeping its
reference distributions) and every checkpoint is scored against it: perplexity, KL, top-1,
bits per weight. Prints one JSON line per row, then a markdown table.

    python benchmarks/quant_table.py                          # smollm2-135m, rtn/gptq/awq at 3/4/8 bits, nf4, fp8
    python benchmarks/quant_table.py --methods gptq --bits 4 --out /tmp/qt
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from compress.evaluate import EvalConfig, evaluate
from compress.loading import load_model
from compress.models import resolve
from compress.runner import folder_tensor_bytes
from compress.sizes import size_report


def timed_run(cmd: list[str], env: dict | None = None) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS MB) of `cmd` run under /usr/bin/time -v."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    seconds = sum(float(p) * 60**i for i, p in enumerate(reversed(wall.split(":"))))
    return proc.stdout, seconds, peak_kb / 1024


def timed_quantize(model: str, method: str, bits: int | None, group_size: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "compress", "quantize", model, "-o", str(out), "--method", method,
           "--overwrite", "--quiet", "--json"]
    if bits is not None:
        cmd += ["--bits", str(bits), "--group-size", str(group_size), "--symmetric"]
    _, seconds, peak_mb = timed_run(cmd)
    return {"run_seconds": seconds, "peak_rss_mb": peak_mb}


def evaluate_base(model_ref: str) -> tuple[dict, object]:
    """(base row {"method": "none", ...}, its reference distributions for KL and top-1)."""
    model, tokenizer, _ = load_model(model_ref)
    base, reference = evaluate(model, tokenizer, EvalConfig(speed=False), keep_reference=True)
    row = {"method": "none", "perplexity": base.perplexity, "kl": 0.0, "top1": 1.0,
           "disk_bytes": folder_tensor_bytes(resolve(model_ref))}
    print(json.dumps(row), flush=True)
    return row, reference


def evaluate_checkpoint(fields: dict, run: dict, reference) -> dict:
    """One checkpoint against the base's reference: the row, printed as a JSON line.
    run: {"path", "run_seconds", "peak_rss_mb"}."""
    start = time.perf_counter()
    model, tokenizer, _ = load_model(str(run["path"]))
    result, _ = evaluate(model, tokenizer, EvalConfig(speed=False), reference=reference)
    row = {**fields, "perplexity": result.perplexity, "kl": result.kl, "top1": result.top1,
           "bits_per_weight": size_report(model).bits_per_weight, "disk_bytes": folder_tensor_bytes(run["path"]),
           "params_kept": kept_parameters(model), "run_seconds": run["run_seconds"], "peak_rss_mb": run["peak_rss_mb"]}
    print(json.dumps(row), flush=True)
    print(f"# evaluated {fields} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return row


def evaluate_checkpoints(model_ref: str, runs: dict) -> list[dict]:
    """Evaluate the base model once (keeping its reference distributions), then every checkpoint
    against it. runs: key -> (row fields, {"path", "run_seconds", "peak_rss_mb"}). Prints and
    returns one row per model, the base first (fields {"method": "none"})."""
    base, reference = evaluate_base(model_ref)
    return [base, *(evaluate_checkpoint(fields, run, reference) for fields, run in runs.values())]


def kept_parameters(model) -> int:
    """Weights the model still has: every parameter and compressed weight, minus pruned ones
    (a low-rank module's factors are parameters, or compressed modules of their own)."""
    dense = sum(p.numel() for p in model.parameters())
    compressed = [m for m in model.modules() if hasattr(m, "format_spec") and next(m.parameters(), None) is None
                  and not any(hasattr(c, "format_spec") for c in m.children())]
    return dense + sum(getattr(m, "nnz", m.num_weights()) for m in compressed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq"])
    ap.add_argument("--bits", nargs="+", type=int, default=[3, 4, 8])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--fixed", nargs="*", default=["nf4", "fp8"], help="methods without a bits setting to add")
    ap.add_argument("--out", type=Path, default=Path("out/quant_table"))
    args = ap.parse_args()

    rows = [(m, b) for b in args.bits for m in args.methods] + [(m, None) for m in args.fixed]
    runs = {}
    for method, bits in rows:
        out = args.out / f"{method}{bits or ''}"
        runs[(method, bits)] = {"path": out, **timed_quantize(args.model, method, bits, args.group_size, out)}
        print(f"# compressed {method} {bits or ''}: {runs[(method, bits)]['run_seconds']:.0f} s", file=sys.stderr)

    results = evaluate_checkpoints(args.model, {
        (method, bits): ({"method": method, "bits": bits, "group_size": args.group_size if bits else None}, run)
        for (method, bits), run in runs.items()})

    print("\n| method | bits | perplexity | KL vs base | top-1 | bits/weight | run time | peak memory |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        if r["method"] == "none":
            print(f"| uncompressed (fp32) | 32 | {r['perplexity']:.3f} | - | - | 32 | - | - |")
            continue
        bits = r["bits"] or {"fp8": "8 (e4m3)", "nf4": "4 (nf4, b64)"}.get(r["method"], "-")
        print(f"| {r['method']} | {bits} | {r['perplexity']:.3f} | {r['kl']:.4f} | {r['top1'] * 100:.2f}% | "
              f"{r['bits_per_weight']:.3f} | {r['run_seconds']:.0f} s | {r['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
