"""Two versions of the C++ CPU kernels (cuda/csrc/cpu_int_matmul.cpp) timed against each other in
one process: the source at a git revision (`--base`, default HEAD) and the working tree's.

This project's CPU machine is shared and its timings drift by 30% or more between runs, so two
builds timed in separate runs cannot be compared; here each (format, shape, M) alternates the two
libraries round by round, on the same tensors, and reports both medians, their ratio
(`ratio` = working tree / base time: below 1 is faster) and the largest difference of their
outputs. The fused matmuls are called directly (cpu_fused checks and converts the arguments as it
does for a layer), so Python's per-call cost is left out. One JSON line per row on stdout.

With `--decode MODEL` (a compressed checkpoint, e.g. the demo's out/smollm2-gptq-int4), it times
greedy decoding of that model instead, the two libraries alternating as the kernels the model's
layers call: a layer timed alone finds its weight in cache, a decoded token's layers do not.

    python benchmarks/cpu_kernels_ab.py --base 91f082b
    python benchmarks/cpu_kernels_ab.py --formats w4g64 --shapes 4096x4096 --ms 1 4
    python benchmarks/cpu_kernels_ab.py --base HEAD~1 --decode out/smollm2-gptq-int4
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# Run as a script, this folder comes first on sys.path, and its kernels.py would shadow the
# `kernels` package that transformers imports where it is installed (--decode)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "cuda/csrc/cpu_int_matmul.cpp"
FORMATS = {  # name -> (bits, group_size, symmetric, 2:4); bits 0: 2:4 fp32 values (SparseLinear)
    "w4g64": (4, 64, True, False), "w4g128": (4, 128, True, False), "w4g32-asym": (4, 32, False, False),
    "w8": (8, 1 << 30, True, False), "w2g64": (2, 64, False, False), "sp24w4g128": (4, 128, True, True),
    "sp24w4g64": (4, 64, True, True), "sp24w8g128": (8, 128, True, True), "sp24w2g128": (2, 128, False, True),
    "sp24f32": (0, 1 << 30, True, True),
}
SHAPES = ["576x576", "1536x576", "576x1536", "4096x4096"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision of the other version")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--ms", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--rounds", type=int, default=7, help="alternations of the two libraries")
    parser.add_argument("--march", help="build both for this -march (e.g. x86-64-v3: AVX2) instead of the CPU's own")
    parser.add_argument("--decode", metavar="MODEL", help="time greedy decoding of this model instead")
    parser.add_argument("--tokens", type=int, default=32, help="tokens a --decode timing generates")
    args = parser.parse_args()

    from compress.cuda import cpu_fused, cpu_native
    from compress.cuda.layout import words_of
    from compress.quant.packing import pack_codes

    if args.march:
        cpu_native._FLAGS = (cpu_native._FLAGS[0], [f"-march={args.march}", "-fopenmp"], [f"-march={args.march}"])
    base = subprocess.run(["git", "show", f"{args.base}:{SOURCE}"], cwd=ROOT, capture_output=True, check=True).stdout
    commit = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()  # what the lines name: HEAD moves
    libs = {args.base: cpu_native.load(base), "tree": cpu_native.load((ROOT / SOURCE).read_bytes())}
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if args.march:
        cpu += f", -march={args.march}"
    if args.decode:
        decode_ab(args.decode, libs, args.tokens, args.rounds, commit, cpu)
        return
    torch.manual_seed(0)
    for name in args.formats:
        bits, group_size, symmetric, sp24 = FORMATS[name]
        for shape in args.shapes:
            n, k = map(int, shape.split("x"))
            if sp24:  # the first kept value of each group of 4 in slot 0-2, the second after it
                first = torch.randint(0, 3, (n, k // 4))
                second = torch.maximum(torch.randint(0, 4, (n, k // 4)), first + 1)
                positions = words_of(pack_codes(torch.stack([first, second], -1).reshape(n, -1).to(torch.uint8), 2))
            if not bits:
                values = torch.randn(n, k // 2)
            elif not (cpu_fused.sp24_applies if sp24 else cpu_fused.applies)(bits, group_size, k):
                continue
            else:
                groups = -(-k // min(group_size, k))
                words = words_of(pack_codes(torch.randint(0, 2 ** bits, (n, k // 2 if sp24 else k), dtype=torch.uint8),
                                            bits))
                scales = (torch.rand(groups, n) * 0.01 + 0.001).half()
                zeros = None if symmetric else torch.randint(0, 2 ** bits, (groups, n), dtype=torch.uint8)
                if sp24:
                    scales, zeros, span = cpu_fused.checked_sp24(words, positions, scales, zeros, bits, group_size, k)
                else:
                    scales, zeros, span = cpu_fused.checked_weight(words, scales, zeros, k, bits, group_size, k, True)
            for m in args.ms:
                x = torch.randn(m, k)
                y = torch.empty(m, n)

                def call(lib):
                    if not bits:
                        lib.sp24_float_matmul(x.data_ptr(), m, k, values.data_ptr(),
                                              cpu_fused.SCALE_KINDS[values.dtype], values.stride(0), n,
                                              positions.data_ptr(), positions.stride(0), y.data_ptr(),
                                              torch.get_num_threads())
                        return
                    common = (scales.data_ptr(), cpu_fused.SCALE_KINDS[scales.dtype],
                              None if zeros is None else zeros.data_ptr(), bits, span, y.data_ptr(),
                              torch.get_num_threads())
                    if sp24:
                        lib.sp24_int_matmul(x.data_ptr(), m, k, words.data_ptr(), n, words.stride(0),
                                            positions.data_ptr(), positions.stride(0), *common)
                    else:
                        lib.int_matmul(x.data_ptr(), m, k, words.data_ptr(), n, words.stride(0), *common)

                calls = max(3, int(2e7 // (n * k * m)))  # about 20 M weight-rows a timing
                times = {label: [] for label in libs}
                outputs = {}
                for _ in range(args.rounds):
                    for label, lib in libs.items():
                        call(lib)
                        t = time.perf_counter()
                        for _ in range(calls):
                            call(lib)
                        times[label].append((time.perf_counter() - t) / calls * 1e3)
                        outputs[label] = y.clone()
                ms = {label: statistics.median(v) for label, v in times.items()}
                print(json.dumps({"format": name, "shape": shape, "m": m, "cpu": cpu, "base": commit,
                                  "base_ms": round(ms[args.base], 4), "tree_ms": round(ms["tree"], 4),
                                  "ratio": round(ms["tree"] / ms[args.base], 3),
                                  "max_abs_diff": float((outputs["tree"] - outputs[args.base]).abs().max())}),
                      flush=True)


@torch.no_grad()
def decode_ab(model_ref: str, libs: dict, tokens: int, rounds: int, commit: str, cpu: str) -> None:
    """Milliseconds a greedy decoded token of `model_ref` (after a 16-token prompt) with each
    library as the one the layers call; one JSON line."""
    from compress.cuda import cpu_native
    from compress.loading import load_model

    model, _, _ = load_model(model_ref)
    prompt = torch.randint(100, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    times = {label: [] for label in libs}
    outputs = {}
    for round_ in range(rounds + 1):  # the first round warms both up
        for label, lib in libs.items():
            cpu_native._library = lib
            t = time.perf_counter()
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                                 min_new_tokens=tokens, do_sample=False, pad_token_id=0)
            if round_:
                times[label].append((time.perf_counter() - t) / tokens * 1e3)
            outputs[label] = out
    ms = {label: statistics.median(v) for label, v in times.items()}
    base = next(iter(libs))
    print(json.dumps({"decode": model_ref, "tokens": tokens, "cpu": cpu, "base": commit,
                      "base_ms_per_token": round(ms[base], 2), "tree_ms_per_token": round(ms["tree"], 2),
                      "ratio": round(ms["tree"] / ms[base], 3),
                      "same_tokens": bool(torch.equal(outputs["tree"], outputs[base]))}), flush=True)


if __name__ == "__main__":
    main()
