"""Integer-weight matmuls on CPU: the fused path (cuda/cpu_fused.py) and the C++ dequantization
(cuda/cpu_dequantize.py) against the reference and a dense matmul, measured in the same run.

For each (format, N x K weight, M tokens, activation dtype): y = x[M, K] @ W.T with random codes
and scales, each contender timed by the median of repeated calls after a warm-up (which compiles
the fused path):
  - `dense`:     F.linear with the dense weight in x's dtype (the float model's layer);
  - `reference`: what a quantized layer ran before the fused path existed: dequantize_words,
                 then F.linear (cuda/layout.py);
  - `fused`:     cuda/cpu_fused.matmul;
  - `dequant`:   what "auto" runs above cpu_fused.MAX_M rows (sp24_max_m for 2:4): the weight
                 dequantized in C++ a block of rows at a time, each block's F.linear
                 (cpu_dequantize.int_linear);
  - `packed`:    PyTorch's packed int4 or int8 CPU matmul (cuda/cpu_packed.py), bf16 only and
                 where it takes the format.
`sp24w4g128`: a 2:4 sparse weight whose kept values are 4-bit codes (SparseQuantLinear's format):
`reference` is dequantize_sp24_words + F.linear, `fused` cuda/cpu_fused.sp24_matmul, `dequant`
cpu_dequantize.sp24_int_linear, `dense` the
same (half-zero) weight as a dense matmul. `sp24f32`: a 2:4 weight of fp32 values (SparseLinear's
format): dense_sp24_values + F.linear, cuda/cpu_fused.sp24_float_matmul and
cpu_dequantize.sp24_float_linear.
`*_speedup` is dense time / that time. One JSON line per row on stdout, the CPU and thread count
in each. Weights small enough to stay in cache (smollm2-135m's are) favour the dense matmul over
what a decode step sees, where every layer's weights come from memory: the 4096 x 4096 rows show
the memory-bound case.

    python benchmarks/cpu_kernels.py
    python benchmarks/cpu_kernels.py --formats w4g64 --ms 1 16 --shapes 4096x4096
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

SHAPES = ["576x576", "192x576", "1536x576", "576x1536", "4096x4096"]  # N x K: smollm2-135m's layers, and 4096^2
MS = [1, 2, 4, 8, 16, 32, 64, 512]
FORMATS = {  # name -> (bits, group_size, symmetric, 2:4)
    "w4g64": (4, 64, True, False), "w4g128-asym": (4, 128, False, False), "w8": (8, 1 << 30, True, False),
    "w2g64": (2, 64, False, False), "sp24w4g128": (4, 128, True, True), "sp24f32": (32, 0, True, True),
}


def _time_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--ms", nargs="+", type=int, default=MS)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from compress.cuda import cpu_dequantize, cpu_fused, cpu_packed
    from compress.cuda.layout import dense_sp24_values, dequantize_sp24_words, dequantize_words, words_of
    from compress.quant.packing import pack_codes

    torch.manual_seed(0)
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    for name in args.formats:
        bits, group_size, symmetric, sp24 = FORMATS[name]
        for shape in args.shapes:
            n, k = map(int, shape.split("x"))
            group = min(group_size, k) or k
            groups = -(-k // group)  # a short last group where the group does not divide K
            if bits < 32:
                codes = torch.randint(0, 2 ** bits, (n, k // 2 if sp24 else k), dtype=torch.uint8)
                words = words_of(pack_codes(codes, bits))
                scales = (torch.rand(groups, n) * 0.01 + 0.001).half()
                zeros = None if symmetric else torch.randint(0, 2 ** bits, (groups, n), dtype=torch.uint8)
            if sp24:  # slots: the first kept value of each group of 4 in slot 0-2, the second after it
                first = torch.randint(0, 3, (n, k // 4))
                second = torch.maximum(torch.randint(0, 4, (n, k // 4)), first + 1)
                positions = words_of(pack_codes(torch.stack([first, second], -1).reshape(n, -1).to(torch.uint8), 2))
            if bits == 32:
                values = torch.randn(n, k // 2) * 0.02
                weight = lambda dtype: dense_sp24_values(values, positions, k, dtype)  # noqa: E731
                fused = lambda x: cpu_fused.sp24_float_matmul(x, values, positions, k)  # noqa: E731
                dequant = lambda x: cpu_dequantize.sp24_float_linear(x, values, positions, k)  # noqa: E731
                fits = True
            elif sp24:
                weight = lambda dtype: dequantize_sp24_words(words, positions, scales, zeros, bits,  # noqa: E731
                                                             group_size, k, dtype)
                fused = lambda x: cpu_fused.sp24_matmul(x, words, positions, scales, zeros, bits,  # noqa: E731
                                                        group_size, k)
                dequant = lambda x: cpu_dequantize.sp24_int_linear(x, words, positions, scales,  # noqa: E731
                                                                   zeros, bits, group_size, k)
                fits = cpu_fused.sp24_applies(bits, group_size, k)
            else:
                weight = lambda dtype: dequantize_words(words, scales, zeros, bits, group_size, k, dtype)  # noqa: E731
                fused = lambda x: cpu_fused.matmul(x, words, scales, zeros, bits, group_size, k)  # noqa: E731
                dequant = lambda x: cpu_dequantize.int_linear(x, words, scales, zeros, bits,  # noqa: E731
                                                              group_size, k)
                fits = cpu_fused.applies(bits, group_size, k)
            for dtype_name in args.dtypes:
                dtype = getattr(torch, dtype_name)
                dense = weight(dtype)
                packed = None
                if dtype == torch.bfloat16 and not sp24 and cpu_packed.int4_applies(bits, group_size, k, n):
                    p, sz = cpu_packed.pack_int4(codes, scales.T, None if zeros is None else zeros.T, dtype)
                    packed = lambda x: cpu_packed.int4_matmul(x, p, sz, group)  # noqa: E731
                elif dtype == torch.bfloat16 and not sp24 and cpu_packed.int8_applies(bits, group_size, k, symmetric):
                    p, sz = cpu_packed.pack_int8(codes, scales.T, dtype)
                    packed = lambda x: cpu_packed.int8_matmul(x, p, sz)  # noqa: E731
                for m in args.ms:
                    x = torch.randn(m, k, dtype=dtype)
                    row = {"format": name, "shape": shape, "m": m, "dtype": dtype_name, "cpu": cpu}
                    row["dense_ms"] = _time_ms(lambda: torch.nn.functional.linear(x, dense), args.repeats)
                    row["reference_ms"] = _time_ms(lambda: torch.nn.functional.linear(x, weight(dtype)), args.repeats)
                    if fits:
                        row["fused_ms"] = _time_ms(lambda: fused(x), args.repeats)
                        row["dequant_ms"] = _time_ms(lambda: dequant(x), args.repeats)
                    if packed is not None:
                        row["packed_ms"] = _time_ms(lambda: packed(x), args.repeats)
                    for key in ("reference", "fused", "dequant", "packed"):
                        if f"{key}_ms" in row:
                            row[f"{key}_speedup"] = round(row["dense_ms"] / row[f"{key}_ms"], 3)
                    print(json.dumps({key: round(v, 4) if isinstance(v, float) else v for key, v in row.items()}),
                          flush=True)


if __name__ == "__main__":
    main()
