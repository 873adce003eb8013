"""Our quantization beside llm-compressor's: the same schemes, model, data and protocol.

For each scheme (symmetric int weights, group size 64, every decoder Linear, lm_head and the
tied embeddings left in float):

- ours: `compress quantize` in its own process under /usr/bin/time -v (benchmarks/quant_table.py's
  `timed_quantize`);
- llm-compressor: benchmarks/peers_worker.py, run with the Python of its own virtual environment
  (benchmarks/.venv-peers, made by benchmarks/peers_setup.sh: it pins its own transformers and
  compressed-tensors), also under /usr/bin/time -v; it writes the fake-quantized weights as a
  plain float32 Hugging Face folder;

and every result of both toolkits is scored in this process (our venv) with the protocol of
../shared/EVAL.md against one evaluation of the base model (its reference distributions kept):
perplexity on wiki (64 x 512), KL(base || model) and top-1 agreement on the first 8 windows.
The base model is evaluated first and every result as soon as it exists, so a long run prints
as it goes: one JSON line for the setup, one for the base model, one per (toolkit, scheme);
then a markdown table and a line per scheme with the two side by side. Each run's time and
memory are also recorded beside its result (`--reuse` evaluates those results again without
recompressing).

Schemes: gptq-w4, gptq-w3 (GPTQ, dampening 0.01 of mean diag(H), act-order, blocks of 128 on both
sides) and rtn-w4, rtn-w3 (round to nearest: llm-compressor's QuantizationModifier with no
calibration data); sparsegpt-50, sparsegpt-2of4, wanda-50, wanda-2of4, magnitude-50 (half the
weights of every Linear but lm_head pruned, unstructured or 2:4: `compress prune` against
llm-compressor's SparseGPTModifier / WandaPruningModifier / one-shot MagnitudePruningModifier,
each at its defaults, on the same calibration tokens); sparsegpt-2of4-w4 (2:4 + symmetric 4-bit
at --group-size: ours prunes and quantizes in one pass, `compress prune --bits 4`; theirs runs
SparseGPTModifier then GPTQModifier). For the pruning schemes each result's weights are measured
as evaluated: the share of zeros and, for 2:4, of groups of 4 holding at least 2 zeros.

Fairness:
- same model file: both sides load the same prepared folder (safetensors, fp32, CPU);
- same calibration tokens: the `news` text tokenized here by our own code (the first 64
  consecutive 512-token chunks, exactly what `compress quantize` uses), saved with torch.save
  and handed to llm-compressor as pre-tokenized input_ids (no shuffling, no truncation);
- same protocol and code for scoring, against the same single base evaluation;
- same machine, measured in the same run, one process at a time, torch's default thread count;
  the wall time and peak RSS are of each whole process (Python start, imports, model load,
  quantization, writing the result), so llm-compressor's heavier imports count against it and
  our packed checkpoint writing against us.
Known differences (each side at its defaults): llm-compressor computes every group's grid from
the original weights up front with its min/max observer; ours is computed when GPTQ reaches the
group's first column, from the error-compensated weights (`static_groups: true` would match
theirs), and its range is clipped to the least rounding error weighted by diag(H) (`clip: true`;
`clip: false` is min/max, as theirs); its scales stay float32 here (the model's dtype), ours are
rounded to float16 before the codes are chosen; on a Hessian that cannot be factorised it falls back to round-to-nearest for that module,
ours raises the dampening. The grid itself is the same: scale = 2*absmax/(2^bits - 1), codes in
[-2^(bits-1), 2^(bits-1) - 1] (ours stored with zero point 2^(bits-1)); for RTN the two agree
but for the ties that the float16 rounding of our scales moves (the group's most negative weight
lands on -7.5 steps with an exact float32 scale, which rounds to -8).

Another process using the CPU at the same time inflates both sides' times; compare the two only
within one run.

    benchmarks/peers_setup.sh                              # once: benchmarks/.venv-peers
    .venv/bin/python benchmarks/peers.py                   # every scheme (hours on 2 cores)
    .venv/bin/python benchmarks/peers.py --schemes gptq-w4 --out /tmp/peers
    .venv/bin/python benchmarks/peers.py --skip-peers      # ours only
    .venv/bin/python benchmarks/peers.py --table out/peers.jsonl   # the table of a saved stdout
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchmarks/ is not a package
from quant_table import timed_quantize, timed_run  # noqa: E402

from compress.evaluate import EvalConfig, evaluate  # noqa: E402
from compress.loading import load_model  # noqa: E402
from compress.models import resolve  # noqa: E402
from compress.pipeline import CalibrationConfig  # noqa: E402
from compress.runner import calibration_samples  # noqa: E402
from compress.sizes import size_report  # noqa: E402

SCHEMES = {"gptq-w4": ("gptq", 4), "gptq-w3": ("gptq", 3), "rtn-w4": ("rtn", 4), "rtn-w3": ("rtn", 3),
           # pruning: (method, pattern), half the weights of every Linear but lm_head
           "sparsegpt-50": ("sparsegpt", "unstructured"), "sparsegpt-2of4": ("sparsegpt", "2:4"),
           "wanda-50": ("wanda", "unstructured"), "wanda-2of4": ("wanda", "2:4"),
           "magnitude-50": ("magnitude", "unstructured"),
           # 2:4 + 4-bit at --group-size: ours joint (compress prune --bits 4), theirs SparseGPT then GPTQ
           "sparsegpt-2of4-w4": ("sparsegpt+gptq", "2:4")}
PRUNING = {"sparsegpt", "wanda", "magnitude", "sparsegpt+gptq"}
PEERS_PYTHON = HERE / ".venv-peers" / "bin" / "python"
WORKER = HERE / "peers_worker.py"
TOOLKITS = {"ours": "compress", "peers": "llm-compressor"}


def peer_quantize(model_dir: Path, calibration: Path, method: str, bits: int | str, group_size: int,
                  out: Path) -> dict:
    cmd = [str(PEERS_PYTHON), str(WORKER), str(model_dir), str(calibration), str(out), "--method", method]
    if method in PRUNING:
        cmd += ["--pattern", bits]
    if method not in PRUNING or method == "sparsegpt+gptq":
        cmd += ["--bits", "4" if method in PRUNING else str(bits), "--group-size", str(group_size), "--damp", "0.01"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    stdout, seconds, peak_mb = timed_run(cmd, env)
    info = json.loads(stdout.strip().splitlines()[-1])
    return {"run_seconds": seconds, "peak_rss_mb": peak_mb, **info}


def write_calibration(model_dir: Path, path: Path) -> torch.Tensor:
    """The calibration windows exactly as `compress quantize` builds them, saved for the worker."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = calibration_samples(tokenizer, CalibrationConfig(), AutoConfig.from_pretrained(model_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ids.clone().contiguous(), path)
    return ids


def compress_one(toolkit: str, scheme: str, model_dir: Path, calibration: Path, group_size: int, out: Path,
                 record: Path, setup: dict, reuse: bool) -> dict:
    """Run one compression (or, with reuse, read the record of an earlier identical one)."""
    if reuse and record.is_file() and (out / "config.json").is_file():
        run = json.loads(record.read_text())
        if run.get("setup") == setup:
            print(f"# reusing {out} (compressed earlier: {run['run_seconds']:.0f} s)", file=sys.stderr, flush=True)
            return run
    method, bits = SCHEMES[scheme]
    if toolkit == "ours" and method in PRUNING:
        joint = ["--bits", "4", "--group-size", str(group_size)] if method == "sparsegpt+gptq" else []
        _, seconds, peak_mb = timed_run([sys.executable, "-m", "compress", "prune", str(model_dir), "-o", str(out),
                                         "--method", method.split("+")[0], "--pattern", bits, *joint, "--overwrite",
                                         "--quiet", "--json"])
        run = {"run_seconds": seconds, "peak_rss_mb": peak_mb}
    elif toolkit == "ours":
        run = timed_quantize(str(model_dir), method, bits, group_size, out)
    else:
        run = peer_quantize(model_dir, calibration, method, bits, group_size, out)
    run["setup"] = setup
    record.write_text(json.dumps(run))
    print(f"# {TOOLKITS[toolkit]} {scheme}: compressed in {run['run_seconds']:.0f} s", file=sys.stderr, flush=True)
    return run


def achieved_pattern(model: torch.nn.Module, pattern: str) -> dict:
    """What a pruning scheme left in the weights the model computes with, over every Linear but
    lm_head: the share of zeros, and for N:M the share of groups of M with at least N zeros."""
    zeros = total = groups_ok = groups = 0
    for name, module in model.named_modules():
        if name.endswith("lm_head"):
            continue
        if hasattr(module, "dequantized_weight"):
            w = module.dequantized_weight()
        elif isinstance(module, torch.nn.Linear):
            w = module.weight.detach()
        else:
            continue
        z = w == 0
        zeros, total = zeros + int(z.sum()), total + z.numel()
        if pattern != "unstructured":
            n, m = map(int, pattern.split(":"))
            counts = z.reshape(-1, m).sum(-1)
            groups_ok, groups = groups_ok + int((counts >= n).sum()), groups + counts.numel()
    return {"zeros": zeros / total, **({"pattern_groups": groups_ok / groups} if groups else {})}


def print_table(base_perplexity: float, results: list[dict], schemes: list[str]) -> None:
    """The markdown table of the JSON rows, then one line per scheme with both toolkits side by side."""
    print("\n| scheme | toolkit | perplexity | KL vs base | top-1 | zeros (pattern groups) | run time | peak memory |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| uncompressed (fp32) | - | {base_perplexity:.3f} | - | - | - | - | - |")
    for r in results:
        scheme = r["scheme"] if r["method"] in PRUNING - {"sparsegpt+gptq"} else f"{r['scheme']} g{r['group_size']}"
        zeros = "-" if "zeros" not in r else f"{r['zeros'] * 100:.2f}%" + (
            f" ({r['pattern_groups'] * 100:.3f}%)" if "pattern_groups" in r else "")
        print(f"| {scheme} | {r['toolkit']} | {r['perplexity']:.3f} | {r['kl']:.4f} | "
              f"{r['top1'] * 100:.2f}% | {zeros} | {r['run_seconds']:.0f} s | {r['peak_rss_mb']:.0f} MB |")
    by_key = {(r["toolkit"], r["scheme"]): r for r in results}
    lines = []
    for scheme in schemes:
        ours, peer = by_key.get(("compress", scheme)), by_key.get(("llm-compressor", scheme))
        if ours and peer:
            lines.append(f"{scheme}, compress vs llm-compressor: KL {ours['kl']:.4f} vs {peer['kl']:.4f}, "
                         f"top-1 {ours['top1'] * 100:.2f}% vs {peer['top1'] * 100:.2f}%, "
                         f"perplexity {ours['perplexity']:.3f} vs {peer['perplexity']:.3f}, "
                         f"wall {ours['run_seconds']:.0f} s vs {peer['run_seconds']:.0f} s")
    if lines:
        print("\n" + "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="Prepared name or Hugging Face model folder.")
    ap.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("out/peers"))
    ap.add_argument("--skip-ours", action="store_true", help="Run only llm-compressor.")
    ap.add_argument("--skip-peers", action="store_true", help="Run only compress.")
    ap.add_argument("--reuse", action="store_true", help="Evaluate a result already in --out from an identical "
                    "earlier run (with the time and memory recorded then) instead of compressing again.")
    ap.add_argument("--table", type=Path, metavar="JSONL", help="Only print the table of the JSON lines an "
                    "earlier run printed (e.g. one cut short), then exit.")
    args = ap.parse_args()
    if args.table:
        rows = [json.loads(line) for line in args.table.read_text().splitlines() if line.startswith("{")]
        base = next(r for r in rows if r.get("toolkit") == "none")
        results = [r for r in rows if r.get("toolkit") in TOOLKITS.values()]
        return print_table(base["perplexity"], results, list(dict.fromkeys(r["scheme"] for r in results)))
    toolkits = [t for t, skip in (("ours", args.skip_ours), ("peers", args.skip_peers)) if not skip]
    if not toolkits:
        raise SystemExit("nothing to run: --skip-ours and --skip-peers together")
    if "peers" in toolkits and not PEERS_PYTHON.is_file():
        raise SystemExit(f"{PEERS_PYTHON} is missing: run benchmarks/peers_setup.sh first (or pass --skip-peers)")

    model_dir = resolve(args.model)  # both sides read this very folder
    calibration = args.out / "calibration.pt"
    ids = write_calibration(model_dir, calibration)
    setup = {"model": str(model_dir), "calibration": "news", "samples": ids.shape[0], "seq_len": ids.shape[1],
             "token_sum": int(ids.sum()), "group_size": args.group_size}
    print(json.dumps(setup), flush=True)

    # The base model first, so that each result is scored (and printed) as soon as it exists.
    config = EvalConfig(speed=False)
    start = time.perf_counter()
    model, tokenizer, _ = load_model(str(model_dir))
    base, reference = evaluate(model, tokenizer, config, keep_reference=True)
    del model
    print(f"# evaluated the base model in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(json.dumps({"toolkit": "none", "scheme": "fp32", "perplexity": base.perplexity, "kl": 0.0, "top1": 1.0}),
          flush=True)

    results = []
    for scheme in args.schemes:
        method, bits = SCHEMES[scheme]
        for toolkit in toolkits:
            out = args.out / f"{toolkit}-{scheme}"
            run = compress_one(toolkit, scheme, model_dir, calibration, args.group_size, out,
                               args.out / f"{toolkit}-{scheme}.run.json", setup, args.reuse)
            start = time.perf_counter()
            model, tokenizer, _ = load_model(str(out))
            result, _ = evaluate(model, tokenizer, config, reference=reference)
            row = {"toolkit": TOOLKITS[toolkit], "scheme": scheme, "method": method, "bits": bits,
                   "group_size": args.group_size, "perplexity": result.perplexity, "kl": result.kl,
                   "top1": result.top1, "run_seconds": run["run_seconds"], "peak_rss_mb": run["peak_rss_mb"]}
            if method in PRUNING:
                row |= achieved_pattern(model, bits)
            if toolkit == "ours":
                row["bits_per_weight"] = size_report(model).bits_per_weight
            else:
                row |= {"oneshot_seconds": run["oneshot_seconds"], "modules_quantized": run["modules_quantized"],
                        "versions": run["versions"]}
            del model
            print(json.dumps(row), flush=True)
            results.append(row)
            print(f"# evaluated {TOOLKITS[toolkit]} {scheme} in {time.perf_counter() - start:.0f} s", file=sys.stderr,
                  flush=True)

    print_table(base.perplexity, results, args.schemes)


if __name__ == "__main__":
    main()
