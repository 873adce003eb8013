"""Instructions per weight in the hot loop of each integer-matmul kernel, compiled without a GPU.

At M = 1 to 16 a weight-only kernel should be bound by memory bandwidth, and it is not when its
loop issues too many instructions per weight: an H100 issues one warp instruction per scheduler
and cycle (4 per SM), so at 132 SMs and ~1.75 GHz a kernel spending 8 instructions per weight
and thread (0.25 warp instructions) needs about 12 µs for a 4096 x 11008 weight, while reading
its 22.5 MB of 4-bit codes takes 6.7 µs at 3.35 TB/s. This script compiles every candidate
configuration in cuda/int_matmul.py with Triton's compiler for a target architecture (no GPU
needed), disassembles the cubin with the nvdisasm Triton ships, finds the loop with the most
instructions (the K loop) and prints one JSON line per (kernel, configuration): the loop's
instructions, the weights each thread handles per iteration, their ratio, and the most
frequent opcodes. These are static counts, a proxy to steer
kernel work between GPU sessions: the speed itself is measured by benchmarks/kernels.py.

    python benchmarks/kernel_sass.py                   # 4-bit, group 128, bf16, sm_90
    python benchmarks/kernel_sass.py --bits 8 --arch 80 --kernels mma gemv
    python benchmarks/kernel_sass.py --sp24 --bits 16      # 2:4 bf16 values (SparseLinear)

Weights are counted dense: a 2:4 tile of BLOCK_K columns counts BLOCK_K weights per row.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

INTS = ("N", "K", "n_words", "n_pos_words", "stride_xm", "stride_ym")  # multiples of 16 on real shapes (M is not: 1 at decode)


def compile_kernel(fn, pointer_types: dict[str, str], consts: dict, warps: int, stages: int | None, arch: int):
    """Compile `fn` as Triton's launcher would for 16-aligned pointers and sizes that are multiples
    of 16 (Triton specializes on both): the divisibility hints change the code it emits."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {n: pointer_types.get(n, "i32") for n in names if n not in consts} | {n: "constexpr" for n in consts}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in sig if sig[n].startswith("*") or n in INTS}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()}, attrs=attrs)
    from compress.cuda.int_matmul import FP_FUSION

    options = {"num_warps": warps, "enable_fp_fusion": FP_FUSION} | ({"num_stages": stages} if stages else {})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def hot_loop(sass: str) -> collections.Counter:
    """Opcodes of the largest loop: the instructions between a label and a branch back to it."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    best: collections.Counter = collections.Counter()
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+(?:`\()?(\.L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i:
            ops = collections.Counter(
                op.group(1) for body in lines[labels[m.group(1)]:i + 1]
                if (op := re.match(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", body)))
            if sum(ops.values()) > sum(best.values()):
                best = ops
    return best


def disassemble(cubin: bytes) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-c", f.name], capture_output=True, text=True, check=True).stdout


def configurations(kernels: list[str], bits: int, group: int, dtype: str, sp24: bool) -> list[tuple]:
    """(name, kernel, constexprs, warps, stages, weights per thread and iteration) for each candidate."""
    from compress.cuda import int_matmul as im
    from compress.cuda import triton_int as ti

    base = dict(BITS=bits, GROUP=group, HAS_ZEROS=False)
    out = []
    if "gemv" in kernels:
        if sp24 and bits == 16:
            kernel, extra = ti._sp24_gemv_kernel, {}
        else:
            kernel, extra = (ti._sp24_int_gemv_kernel if sp24 else ti._gemv_kernel), dict(EVEN_K=True)
        for bn, bk, nw, ns in im.gemv_configs(sp24, bits):
            if im.block_k_fits(bk, group, bits, sp24):
                out.append((f"gemv n{bn} k{bk} w{nw} s{ns}", kernel,
                            base | extra | dict(BLOCK_N=bn, BLOCK_K=bk, STAGES=ns), nw, None, bn * bk / (32 * nw)))
    for name, kernel, table, fits in (("dot", ti._dot_kernel, im.DOT_CONFIGS, im.block_k_fits),
                                      ("mma", ti._mma_kernel, im.MMA_CONFIGS, im.mma_fits)):
        if name not in kernels:
            continue
        seen = set()
        for configs in table.values():
            for bm, bn, bk, sk, nw, ns in configs:
                if (bm, bn, bk, sk, nw, ns) in seen or not fits(bk, group, bits, sp24):
                    continue
                seen.add((bm, bn, bk, sk, nw, ns))
                consts = base | dict(SP24=sp24, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, FP32=False)
                if name == "mma":  # codes dequantized in bf16 where it holds them exactly, as the launcher decides
                    consts["BF16_CODES"] = dtype == "bf16" and bits < 8
                out.append((f"{name} m{bm} n{bn} k{bk} split{sk} w{nw} s{ns}", kernel, consts, nw, ns,
                            bn * bk / (32 * nw)))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=4, choices=(2, 4, 8, 16), help="16: 2:4 float values (with --sp24)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    p.add_argument("--kernels", nargs="+", default=["gemv", "dot", "mma"], choices=("gemv", "dot", "mma"))
    p.add_argument("--sp24", action="store_true", help="the 2:4 sparse variants (kept values + 2-bit slots)")
    args = p.parse_args(argv)
    if args.bits == 16 and not args.sp24:
        p.error("--bits 16 (float values) is a 2:4 format: add --sp24")
    os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret
    pointers = {"x_ptr": f"*{args.dtype}", "w_ptr": f"*{args.dtype}" if args.bits == 16 else "*i32", "p_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8",
                "y_ptr": "*fp32", "magic": "i32"}
    group = 1 << 30 if args.bits == 16 else args.group_size  # float values have no groups
    candidates = configurations(args.kernels, args.bits, group, args.dtype, args.sp24)
    for name, kernel, consts, warps, stages, per_thread in candidates:
        compiled = compile_kernel(kernel, pointers, consts, warps, stages, args.arch)
        ops = hot_loop(disassemble(compiled.asm["cubin"]))
        total = sum(ops.values())
        print(json.dumps({"candidate": name, "bits": args.bits, "sp24": args.sp24,
                          "group": None if args.bits == 16 else args.group_size, "dtype": args.dtype,
                          "arch": f"sm_{args.arch}", "loop_instructions": total, "weights_per_thread": per_thread,
                          "instructions_per_weight": round(total / per_thread, 2),
                          "top_ops": dict(ops.most_common(8))}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
