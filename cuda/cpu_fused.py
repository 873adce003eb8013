"""Small-M matmuls of integer weights on CPU with the dequantization fused in, compiled by
torch.compile (Inductor's C++ backend).

Where PyTorch's packed CPU kernels do not serve (fp32 and fp16 activations, where they are 5-25x
slower than a dense matmul, cpu_packed.py; formats they refuse), the reference path dequantizes
the whole weight to fp32 on every call before it multiplies: decoding a token at a time, that
writes and reads 4 bytes per weight for every token, and a 4-bit model decodes slower than the
float one. Here one pass reads the codes where they are and multiplies them into x group by group:

    y[m, n] = sum_g scale[g, n] * sum_{k in g} (code[n, k] - zero[g, n]) * x[m, k]

in fp32, the reference's values up to the order of the sums. The codes stay in the kernels' words
(cuda/layout.py), read as bytes: byte j of a row holds the codes of columns cpb * j + i, i < cpb
(cpb = 8 / bits codes per byte, at bits i * bits). So x is split into cpb contiguous "planes"
(plane i = x[..., i::cpb], a small copy per call) and each plane meets its slice of every byte: a
shift and a mask per code and no gather, a loop Inductor vectorizes.

One compilation per bit width, symmetry and dtype, a few seconds, cached on disk by Inductor; the
sizes (M, N, the number of groups) are dynamic, so new shapes reuse it. Compiling needs a C++
compiler: where it fails, the path turns itself off with one warning and the reference runs.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable

import torch

# Largest M served: the work grows with M (every code is decoded once per row of x), while the
# reference dequantizes once and then runs a dense matmul. On this project's 2-core CPU
# (benchmarks/cpu_kernels.py, fp32, 4-bit g64) the fused path is ahead at M = 8 on every shape
# (0.29 against 0.34 ms at 576 x 576, 12 against 36 ms at 4096 x 4096) and behind at M = 16 on
# smollm2-135m's (0.55 against 0.34 ms at 576 x 576).
MAX_M = 8

_failure: str | None = None  # why compiling failed, once it has: the path is off from then on


def applies(bits: int, group_size: int, in_features: int) -> bool:
    """Whether the fused path reads this format: 2, 4 or 8-bit words (cuda/layout.py) in whole
    groups (or per-channel) whose columns fill whole bytes."""
    span = min(group_size, in_features)
    return bits in (2, 4, 8) and in_features % span == 0 and span % (8 // bits) == 0


def available() -> bool:
    """False once compiling has failed in this process (then `failure()` says why)."""
    return _failure is None


def failure() -> str | None:
    return _failure


def _grouped_matmul(planes: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    bits: int) -> torch.Tensor:
    """planes fp32 [M, cpb, n_groups, span / cpb] (plane i: x's columns i, i + cpb, ... of each
    group); codes uint8 [N, n_groups, span / cpb] (byte j of a group: its columns cpb * j + i at
    bits i * bits); scales [n_groups, N]; zeros uint8 [n_groups, N] or None (2**(bits - 1)) ->
    y fp32 [M, N]."""
    mask = (1 << bits) - 1
    zero = 2.0 ** (bits - 1) if zeros is None else zeros.T.float()[:, :, None]  # [N, n_groups, 1]
    acc = 0
    for i in range(8 // bits):
        code = ((codes >> (i * bits)) & mask).float() - zero  # [N, n_groups, span / cpb]
        acc = acc + code * planes[:, None, i]  # [M, N, n_groups, span / cpb]
    return (acc.sum(-1) * scales.T.float()).sum(-1)


_compiled: dict[tuple, Callable] = {}


def _compiled_for(bits: int, symmetric: bool, single_row: bool, scale_dtype: torch.dtype, group_bytes: int) -> Callable:
    """`_grouped_matmul` compiled for one variant: M, N and the number of groups stay dynamic
    within it, a single row of x is a variant of its own (Dynamo specializes sizes of 1), and so
    is the number of bytes per group (static, the loop Inductor vectorizes). Each variant gets a code
    object of its own: Dynamo keeps a function's compilations on its code object and stops
    compiling past 8 of them (`recompile_limit`), which a model mixing widths would reach."""
    key = (bits, symmetric, single_row, scale_dtype, group_bytes)
    if key not in _compiled:
        code = _grouped_matmul.__code__.replace(co_name=f"_grouped_matmul_{len(_compiled)}")
        _compiled[key] = torch.compile(types.FunctionType(code, globals()), dynamic=False, fullgraph=True)
    return _compiled[key]


def matmul(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
           in_features: int) -> torch.Tensor | None:
    """x [M, K] @ dequantize_words(words, ...).T -> [M, N] in x's dtype (words int32 [N, n_words],
    scales [n_groups, N], zeros uint8 [n_groups, N] or None; a format `applies` takes); None when
    compiling has failed (the caller runs the reference)."""
    global _failure
    if _failure is not None:
        return None
    (m, k), n, groups = x.shape, words.shape[0], scales.shape[0]
    cpb, span = 8 // bits, k // groups
    codes = words.view(torch.uint8)[:, : k // cpb].view(n, groups, span // cpb)  # a view: no copy
    planes = x.float().reshape(m, groups, span // cpb, cpb).permute(0, 3, 1, 2).contiguous()
    for t, dims in ((planes, (0, 2)), (codes, (0, 1)), (scales, (0, 1)), (zeros, (0, 1))):
        for d in dims if t is not None else ():
            torch._dynamo.maybe_mark_dynamic(t, d)
    try:
        y = _compiled_for(bits, zeros is None, m == 1, scales.dtype, span // cpb)(planes, codes, scales, zeros, bits)
    except torch._dynamo.exc.BackendCompilerFailed as e:  # no working C++ compiler, typically
        message = str(e.inner_exception).strip()
        _failure = f"{type(e.inner_exception).__name__}: {message.splitlines()[0] if message else ''}"
        warnings.warn(f"compress: the fused CPU matmul could not be compiled ({_failure}); quantized layers "
                      "run the reference path (dequantize, then matmul) on CPU", RuntimeWarning, stacklevel=2)
        return None
    return y.to(x.dtype)
