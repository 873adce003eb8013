"""Integer-weight matmul kernels against bf16 cuBLAS and PyTorch's own low-bit kernels, one GPU.

For each (kernel, N x K weight, M tokens): y = x[M, K] @ W.T with random weights, timed two ways
in the same run with the same timer for every contender, both replaying CUDA graphs (as a served
model runs; launch overhead from Python would otherwise swamp microsecond kernels):
  - `graph`: triton.testing.do_bench_cudagraph (L2 warm: a weight that fits in L2 stays there);
  - `cold`:  each call preceded by overwriting a 256 MB buffer, which evicts the weights from L2
             (as in a decode step, which reads every layer's weights once); the time of the
             overwrites alone, measured the same way, is subtracted.
Contenders: bf16 cuBLAS (F.linear); `ours` (compress.cuda int_matmul restricted to our Triton
kernels and dequantize + cuBLAS, chosen per shape by measurement; `choice` records which);
`auto` (what a QuantLinear with kernel "auto" runs after prepack(bfloat16): the same choice
with PyTorch's tinygemm also weighed where it takes the format; `auto_choice`); and the peers
alone: PyTorch's int4 kernel (`_weight_int4pack_mm`, 4-bit only), its int8 weight-only kernel
(`_weight_int8pack_mm`, 8-bit per-channel only), and where installed GemLite (its Triton
low-bit kernels at its own kernel choice, same codes and scales) and bitsandbytes NF4.
`*_speedup` is bf16 time / that time. One JSON line per row on stdout.
`w3g128`: 3-bit codes as a QuantLinear runs them after prepacking, widened to 4 bits (the same
weight; every contender then reads 4-bit codes, so expect the w4g128 speeds).

`sp24`: a 2:4 sparse bf16 weight (magnitude-pruned random weights): `ours` (our 2:4 Triton
kernels reading the kept values and their 2-bit slots, or decompress + cuBLAS, chosen per shape),
`auto` (the same choice with PyTorch's cuSPARSELt matmul weighed too: what a prepacked 2:4
SparseLinear runs), and PyTorch's semi-structured sparse matmuls alone (CUTLASS, cuSPARSELt),
against the dense bf16 weight through cuBLAS.
`sp24w4g128`: a 2:4 sparse weight whose kept values are 4-bit (group 128, symmetric), the format
of SparseGPT with joint quantization (SparseQuantLinear): our fused kernels (kept codes and
positions decompressed in registers) or dequantize + cuBLAS, chosen per shape as for the dense
formats, beside the dense int4 choice and cuSPARSELt on the same weight dequantized to bf16.

`fp8`: an e4m3 weight with one scale per row (FP8Linear): `ours` (compress.cuda.triton_fp8: our
GEMV or our dequantization + cuBLAS, chosen per shape), `reference` (what FP8Linear ran before:
PyTorch's conversion to fp32, the scales, the cast, then cuBLAS) and, where the GPU has fp8
tensor cores, PyTorch's `_scaled_mm` with x quantized to e4m3 per row on every call (W8A8: other
numerics, `scaled_mm_relerr`), against the dequantized weight in bf16 through cuBLAS.

    python benchmarks/kernels.py                       # the full table (a few minutes on an H100)
    python benchmarks/kernels.py --kernels w4g128 --ms 1 16 --shapes 11008x4096
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

SHAPES = ["4096x4096", "11008x4096", "4096x11008", "8192x8192", "14336x4096"]  # N x K (out x in)
MS = [1, 4, 16, 64, 256, 4096]
KERNELS = {  # name -> (bits, group_size, symmetric)
    "w4g128": (4, 128, True),
    "w4g128-asym": (4, 128, False),
    "w3g128": (3, 128, True),  # widened to 4 bits at prepack, as QuantLinear does
    "w8g128": (8, 128, True),
    "sp24": None,  # 2:4 sparse bf16, PyTorch's semi-structured kernels
    "sp24w4g128": None,  # 2:4 + 4-bit group 128, ours
    "fp8": None,  # e4m3, one scale per row (FP8Linear)
}


def random_weight(n: int, k: int, bits: int, group_size: int, symmetric: bool):
    """A random weight in our kernel layout, and the same codes (at the kernels' width: 3 bits
    widened to 4) for PyTorch's formats."""
    from compress.cuda.int_matmul import IntWeight
    from compress.cuda.layout import kernel_bits, widen_codes, words_of
    from compress.quant.packing import pack_codes

    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, device="cuda")
    groups = -(-k // group_size)
    scales = torch.rand(groups, n, device="cuda").mul_(0.02).add_(0.001).half()
    zeros = None if symmetric else torch.randint(0, 2**bits, (groups, n), dtype=torch.uint8, device="cuda")
    codes, bits = widen_codes(codes, bits, symmetric), kernel_bits(bits)
    ours = IntWeight(words_of(pack_codes(codes, bits)), scales, zeros, bits, group_size, k)
    return ours, codes


def with_library(w, codes: torch.Tensor, dtype: torch.dtype):
    """`w` with the library layout QuantLinear.prepack(dtype) adds: tinygemm (bf16, 4-bit)."""
    import dataclasses

    from compress.cuda import tinygemm

    if dtype == torch.bfloat16 and tinygemm.applies(w.bits, w.group_size, w.in_features, w.out_features):
        zeros = None if w.zeros is None else w.zeros.T.float()
        return dataclasses.replace(w, tinygemm=tinygemm.pack(codes, w.scales.T.float(), zeros))
    return w


def gemlite_peer(codes: torch.Tensor, w, x: torch.Tensor):
    """GemLite's matmul of the same codes, scales and zeros (its format: (q - zero) * scale), at
    its own choice of kernel; None where GemLite is not installed."""
    try:
        import gemlite
    except ImportError:
        return None
    kind = gemlite.DType.BF16 if x.dtype == torch.bfloat16 else gemlite.DType.FP16
    layer = gemlite.GemLiteLinear(w.bits, group_size=w.group_size, in_features=w.in_features,
                                  out_features=w.out_features, input_dtype=kind, output_dtype=kind)
    zeros = 2 ** (w.bits - 1) if w.zeros is None else w.zeros.T.to(x.dtype).contiguous()
    try:
        layer.pack(codes, w.scales.T.to(x.dtype).contiguous(), zeros, bias=None)
    except (RuntimeError, ValueError, AssertionError, NotImplementedError) as e:  # a format it does not take
        print(f"# gemlite cannot pack this weight: {e}", file=sys.stderr)
        return None
    return lambda: layer(x)


def peers(codes: torch.Tensor, w: object, x: torch.Tensor) -> dict:
    """name -> callable for the libraries' kernels that take this format (same codes and scales)."""
    from compress.cuda import tinygemm

    out = {}
    if w.bits == 4:
        packed, sz = tinygemm.pack(codes, w.scales.T, None if w.zeros is None else w.zeros.T)
        out["tinygemm"] = lambda: tinygemm.matmul(x, packed, sz, w.group_size)
    if (gl := gemlite_peer(codes, w, x)) is not None:
        out["gemlite"] = gl
    if w.bits == 8 and w.zeros is None:  # per-channel only: scales of the first group stand in
        w8 = (codes.to(torch.int16) - 128).to(torch.int8)
        s8 = w.scales[0].to(x.dtype).contiguous()
        out["int8_wo"] = lambda: torch._weight_int8pack_mm(x, w8, s8)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError:
        return out
    if w.bits == 4:
        dense = torch.randn(w.out_features, w.in_features, device="cuda", dtype=x.dtype)
        q, state = bnbf.quantize_4bit(dense, blocksize=64, quant_type="nf4")
        out["bnb_nf4"] = lambda: bnb.matmul_4bit(x, q.t(), quant_state=state)
    return out


def sparse_2of4(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """A random [n, k] weight with the two largest of every four consecutive weights of a row kept."""
    from compress.sparsity.masks import nm_mask

    w = torch.randn(n, k, device="cuda", dtype=dtype)
    return w * nm_mask(w.abs(), 2, 4)


def sparse_row(n: int, k: int, m: int, dtype: torch.dtype, flush: torch.Tensor) -> dict:
    """One `sp24` row: our 2:4 kernels (`ours`: our Triton kernels or decompress + cuBLAS, chosen per
    shape; `auto`: the same choice with cuSPARSELt weighed too, what a prepacked 2:4 SparseLinear
    runs) and PyTorch's CUTLASS and cuSPARSELt 2:4 kernels alone, against dense cuBLAS."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    from compress.cuda import cusparselt
    from compress.cuda import int_matmul as im
    from compress.cuda.layout import words_of
    from compress.sparsity.packing import compress_nm

    from compress.sparsity.masks import nm_mask

    w = sparse_2of4(n, k, dtype)
    values, indices = compress_nm(w, nm_mask(w.abs(), 2, 4), 2, 4)  # the kept two of every four
    ours = im.sp24_values(values, words_of(indices))
    packed = cusparselt.pack(w) if cusparselt.applies(n, k, dtype, w.device) else None
    auto = im.sp24_values(values, words_of(indices), packed)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    ref = x.float() @ w.float().T
    row = {"kernel": "sp24", "N": n, "K": k, "M": m}
    for label, weight in (("", ours), ("auto_", auto)):
        y = im.int_matmul(x, weight)  # first call: measures the candidates, keeps the fastest
        row[f"{label}relerr"] = round(((y.float() - ref).norm() / ref.norm()).item(), 5)
        row[f"{label}choice"] = im.TUNER.choices()[im.tuner_key(x, weight)]
    bf16_graph, bf16_cold = time_both(lambda: torch.nn.functional.linear(x, w), flush)
    row.update(bf16_us_graph=round(bf16_graph, 2), bf16_us_cold=round(bf16_cold, 2))
    for label, fn in (("ours", lambda: im.int_matmul(x, ours)), ("auto", lambda: im.int_matmul(x, auto))):
        graph, cold = time_both(fn, flush)
        record(row, label, graph, cold, bf16_graph, bf16_cold)
    weight_bytes = values.numel() * values.element_size() + indices.numel()
    row["ours_TBps_cold"] = round(weight_bytes / (row["ours_us_cold"] * 1e-6) / 1e12, 2)
    backends = (("cutlass", SparseSemiStructuredTensorCUTLASS), ("cusparselt", SparseSemiStructuredTensorCUSPARSELT))
    for label, kind in backends:
        try:
            sparse = kind.from_dense(w)
            y = torch.nn.functional.linear(x, sparse)
            row[f"{label}_relerr"] = round(((y.float() - ref).norm() / ref.norm()).item(), 5)
            graph, cold = time_both(lambda sparse=sparse: torch.nn.functional.linear(x, sparse), flush)
        except (RuntimeError, ValueError, NotImplementedError) as e:  # no such backend in this build, or shape
            row[f"{label}_error"] = str(e).splitlines()[0][:120]
            continue
        record(row, label, graph, cold, bf16_graph, bf16_cold)
    return row


def sparse_int_row(n: int, k: int, m: int, dtype: torch.dtype, flush: torch.Tensor) -> dict:
    """One `sp24w4g128` row: our 2:4 + int4 choice, the dense int4 choice and cuSPARSELt on the
    dequantized weight, against dense bf16 cuBLAS."""
    import dataclasses

    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT

    from compress.cuda import int_matmul as im
    from compress.cuda.layout import words_of
    from compress.quant.packing import pack_codes

    dense_int, _ = random_weight(n, k, 4, 128, True)
    kept = torch.randint(0, 16, (n, k // 2), dtype=torch.uint8, device="cuda")
    slots = torch.rand(n, k // 4, 4, device="cuda").argsort(-1)[..., :2].sort(-1).values  # 2 of every 4
    w = dataclasses.replace(dense_int, words=words_of(pack_codes(kept, 4)),
                            positions=words_of(pack_codes(slots.reshape(n, -1).to(torch.uint8), 2)))
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    dense = im.dequantize(w, dtype)
    ref = x.float() @ dense.float().T
    row = {"kernel": "sp24w4g128", "N": n, "K": k, "M": m}
    y = im.int_matmul(x, w)  # first call: measures the candidates, keeps the fastest
    row["relerr"] = round(((y.float() - ref).norm() / ref.norm()).item(), 5)
    row["choice"] = im.TUNER.choices()[im.tuner_key(x, w)]
    bf16_graph, bf16_cold = time_both(lambda: torch.nn.functional.linear(x, dense), flush)
    row.update(bf16_us_graph=round(bf16_graph, 2), bf16_us_cold=round(bf16_cold, 2))
    contenders = {"ours": lambda: im.int_matmul(x, w), "int4_dense": lambda: im.int_matmul(x, dense_int)}
    try:
        semi = SparseSemiStructuredTensorCUSPARSELT.from_dense(dense)
        contenders["cusparselt"] = lambda: torch.nn.functional.linear(x, semi)
    except (RuntimeError, ValueError, NotImplementedError) as e:
        row["cusparselt_error"] = str(e).splitlines()[0][:120]
    for label, fn in contenders.items():
        graph, cold = time_both(fn, flush)
        record(row, label, graph, cold, bf16_graph, bf16_cold)
    weight_bytes = w.words.numel() * 4 + w.positions.numel() * 4 + w.scales.numel() * 2
    row["ours_TBps_cold"] = round(weight_bytes / (row["ours_us_cold"] * 1e-6) / 1e12, 2)
    return row


def fp8_row(n: int, k: int, m: int, dtype: torch.dtype, flush: torch.Tensor) -> dict:
    """One `fp8` row: our choice, FP8Linear's former reference path and `_scaled_mm` (W8A8) against
    the dequantized weight through bf16 cuBLAS."""
    from compress.cuda import triton_fp8 as tf
    from compress.cuda.fp8_ops import reference_weight

    weight = (torch.randn(n, k, device="cuda") * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scales = torch.rand(n, 1, device="cuda") * 0.01 + 1e-4
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    dense = reference_weight(weight, scales, dtype)
    ref = x.float() @ dense.float().T
    row = {"kernel": "fp8", "N": n, "K": k, "M": m}
    y = tf.fp8_matmul(x, weight, scales)  # first call: measures the candidates, keeps the fastest
    row["relerr"] = round(((y.float() - ref).norm() / ref.norm()).item(), 5)
    row["choice"] = tf.TUNER.choices()[tf.tuner_key(x, weight)]
    bf16_graph, bf16_cold = time_both(lambda: torch.nn.functional.linear(x, dense), flush)
    row.update(bf16_us_graph=round(bf16_graph, 2), bf16_us_cold=round(bf16_cold, 2))
    contenders = {"ours": lambda: tf.fp8_matmul(x, weight, scales),
                  "reference": lambda: torch.nn.functional.linear(x, reference_weight(weight, scales, dtype))}
    row_scales = scales.reshape(1, n).float()

    def scaled_mm():
        x_scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 448.0  # [M, 1]
        x8 = (x.float() / x_scale).to(torch.float8_e4m3fn)
        return torch._scaled_mm(x8, weight.T, scale_a=x_scale, scale_b=row_scales, out_dtype=dtype)

    try:
        row["scaled_mm_relerr"] = round(((scaled_mm().float() - ref).norm() / ref.norm()).item(), 5)
        contenders["scaled_mm"] = scaled_mm
    except (RuntimeError, NotImplementedError) as e:  # no fp8 tensor cores, or this PyTorch's limits
        row["scaled_mm_error"] = str(e).splitlines()[0][:120]
    for label, fn in contenders.items():
        graph, cold = time_both(fn, flush)
        record(row, label, graph, cold, bf16_graph, bf16_cold)
    row["ours_TBps_cold"] = round((weight.numel() + scales.numel() * 4) / (row["ours_us_cold"] * 1e-6) / 1e12, 2)
    return row


def record(row: dict, label: str, graph: float, cold: float, bf16_graph: float, bf16_cold: float) -> None:
    """A contender's times (warm and cold L2, microseconds) and its speedups over bf16 cuBLAS, in `row`."""
    row.update({f"{label}_us_graph": round(graph, 2), f"{label}_us_cold": round(cold, 2),
                f"{label}_speedup_graph": round(bf16_graph / graph, 2),
                f"{label}_speedup_cold": round(bf16_cold / cold, 2)})


def graph_us(body, reps: int) -> float:
    """Microseconds per repetition of `body` captured `reps` times in one CUDA graph (median of 5)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            body()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[2]


def time_both(fn, flush: torch.Tensor) -> tuple[float, float]:
    """(warm-L2 microseconds, cold-L2 microseconds) of one call of `fn`, both from CUDA graphs;
    `flush` is a buffer larger than the L2 cache."""
    import triton.testing as tt

    fn()
    torch.cuda.synchronize()
    warm = tt.do_bench_cudagraph(fn, rep=20) * 1e3
    reps = 20
    flush_only = graph_us(flush.zero_, reps)
    cold = graph_us(lambda: (flush.zero_(), fn()), reps) - flush_only
    return warm, cold


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", nargs="+", default=["w4g128", "w8g128"], choices=sorted(KERNELS))
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="N x K, the weight's out x in")
    ap.add_argument("--ms", nargs="+", type=int, default=MS)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA device")

    from compress.cuda import int_matmul as im

    dtype = getattr(torch, args.dtype)
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    props = torch.cuda.get_device_properties(0)
    print(json.dumps({"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
                      "dtype": args.dtype}), flush=True)
    for name in args.kernels:
        if name in ("sp24", "sp24w4g128", "fp8"):
            make_row = {"sp24": sparse_row, "sp24w4g128": sparse_int_row, "fp8": fp8_row}[name]
            for shape in args.shapes:
                for m in args.ms:
                    print(json.dumps(make_row(*map(int, shape.split("x")), m, dtype, flush)), flush=True)
            continue
        bits, group_size, symmetric = KERNELS[name]
        for shape in args.shapes:
            n, k = map(int, shape.split("x"))
            w, codes = random_weight(n, k, bits, group_size, symmetric)
            w_auto = with_library(w, codes, dtype)
            dense = torch.randn(n, k, device="cuda", dtype=dtype)
            weight_bytes = w.words.numel() * 4 + w.scales.numel() * 2 + (0 if w.zeros is None else w.zeros.numel())
            for m in args.ms:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                row = {"kernel": name, "N": n, "K": k, "M": m}
                ref = x.float() @ im.dequantize(w, torch.float32).T
                for label, weight in (("", w), ("auto_", w_auto)):
                    y = im.int_matmul(x, weight)  # first call: measures the candidates, keeps the fastest
                    row[f"{label}relerr"] = round(((y.float() - ref).norm() / ref.norm()).item(), 5)
                    row[f"{label}choice"] = im.TUNER.choices()[im.tuner_key(x, weight)]
                bf16_graph, bf16_cold = time_both(lambda: torch.nn.functional.linear(x, dense), flush)
                row.update(bf16_us_graph=round(bf16_graph, 2), bf16_us_cold=round(bf16_cold, 2))
                contenders = {"ours": lambda: im.int_matmul(x, w), "auto": lambda: im.int_matmul(x, w_auto),
                              **peers(codes, w, x)}
                for peer in ("tinygemm", "gemlite"):  # same codes and scales as ours: errors are comparable
                    if peer in contenders:
                        y = contenders[peer]().float()
                        row[f"{peer}_relerr"] = round(((y - ref).norm() / ref.norm()).item(), 5)
                for label, fn in contenders.items():
                    try:
                        graph, cold = time_both(fn, flush)
                    except (RuntimeError, NotImplementedError) as e:  # a peer without this shape/dtype
                        row[f"{label}_error"] = str(e).splitlines()[0][:120]
                        continue
                    record(row, label, graph, cold, bf16_graph, bf16_cold)
                row["ours_TBps_cold"] = round(weight_bytes / (row["ours_us_cold"] * 1e-6) / 1e12, 2)
                print(json.dumps(row), flush=True)
            del w, w_auto, codes, dense
            torch.cuda.empty_cache()
    # every candidate's measured time per problem key (milliseconds), for tuning the candidate lists,
    # and the candidates ruled out for disagreeing with dequantize + cuBLAS (a kernel bug to look at)
    print(json.dumps({"tuner_ms": {str(k): v for k, v in im.TUNER.timings.items()},
                      "tuner_rejected": {str(k): v for k, v in im.TUNER.rejected.items()}}), file=sys.stderr)


if __name__ == "__main__":
    main()
