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

One compilation per variant (`_run`: bit width, symmetry, scale dtype, a single row of x or
several, the bytes a group spans and those of a shorter last group), a few seconds, cached on
disk by Inductor; the sizes (M, N, the number of groups) are dynamic, so new shapes reuse it.
Compiling needs a C++ compiler and a Python that Dynamo supports: where compiling or running the
compiled code fails, the path turns itself off with one warning and the reference runs.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable

import torch

# Largest M served: the work grows with M (every code is decoded once per row of x), while the
# reference dequantizes once and then runs a dense matmul. On this project's 2-core CPU
# (benchmarks/results/cpu-2026-12-04, fp32, 4-bit g64) the two are about even at M = 8 on
# smollm2-135m's shapes (0.35 against 0.40 ms at 576 x 576, 0.67 against 0.67 at 576 x 1536;
# 8-bit per-channel 576 x 1536: 0.98 against 0.60) and the fused path is far ahead at 4096 x 4096
# (12 against 37 ms); at M = 16 the reference wins on smollm2's (0.60 against 0.43 ms).
MAX_M = 8
# The same for 2:4 weights, whose reference (scatter the kept codes into a dense weight, then
# dequantize) is 3-7x slower than the dense one: at M = 32 the fused path still takes 0.3-0.8x
# of its time (1.25 against 1.78 ms at 576 x 576, 45 against 156 ms at 4096 x 4096, 4-bit g128).
SP24_MAX_M = 32

_failure: str | None = None  # why compiling failed, once it has: the path is off from then on


def applies(bits: int, group_size: int, in_features: int) -> bool:
    """Whether the fused path reads this format: 2, 4 or 8-bit words (cuda/layout.py) whose groups
    (a shorter last one included) fill whole bytes."""
    span = min(group_size, in_features)
    return bits in (2, 4, 8) and span > 0 and span % (8 // bits) == 0 and in_features % (8 // bits) == 0


def available() -> bool:
    """Whether the path can run: Dynamo supports this Python and is not switched off, and compiling
    has not failed in this process (then `failure()` says why)."""
    return _failure is None and torch._dynamo.is_dynamo_supported() and not torch._dynamo.config.disable


def failure() -> str | None:
    """Why the path cannot run, or None where it can."""
    if _failure is None and not available():
        return "Dynamo is not supported on this Python or is disabled"
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


def _sp24_grouped_matmul(planes: torch.Tensor, codes: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor,
                         zeros: torch.Tensor | None, bits: int, kept: int) -> torch.Tensor:
    """The same for 2:4 weights, a unit of `kept` kept codes (2 or 4: kept / 2 groups of 4 columns)
    at a time. planes fp32 [M, kept / 2, 4, n_groups, units] (plane (h, r): x's column r of the
    unit's group of 4 number h); codes [N, n_groups, units] (uint8 or int32: kept code c of a unit
    at bits c * bits); slots uint8 [N, n_groups, units] (code c's slot in its group of 4 at bits
    2 * c) -> y fp32 [M, N]. Each code's x is picked from its group's four by its slot: selects,
    which vectorize, where a gather would not."""
    mask = (1 << bits) - 1
    zero = 2.0 ** (bits - 1) if zeros is None else zeros.T.float()[:, :, None]  # [N, n_groups, 1]
    codes, slots = codes.int(), slots.int()  # shifts of 32-bit lanes vectorize; of 16-bit ones they did not
    acc = 0
    for c in range(kept):
        code = ((codes >> (c * bits)) & mask).float() - zero  # [N, n_groups, units]
        slot = (slots >> (2 * c)) & 3
        x = planes[:, None, c // 2]  # [M, 1, 4, n_groups, units]
        x = torch.where(slot == 0, x[:, :, 0], torch.where(slot == 1, x[:, :, 1],
                                                            torch.where(slot == 2, x[:, :, 2], x[:, :, 3])))
        acc = acc + code * x  # [M, N, n_groups, units]
    return (acc.sum(-1) * scales.T.float()).sum(-1)


def _summed(grouped: Callable, parts: list[tuple], *constants: int) -> torch.Tensor:
    """The sum of grouped(*part, *constants) over the parts of one matmul (the whole groups and a
    shorter last one), in one compiled call: each call costs tens of microseconds of dispatch."""
    y = 0
    for part in parts:
        y = y + grouped(*part, *constants)
    return y


_compiled: dict[tuple, Callable] = {}


def _run(key: tuple, *args) -> torch.Tensor | None:
    """_summed(*args) compiled for the variant `key`. Each variant gets a code object of its own: Dynamo
    keeps a function's compilations on its code object and stops compiling past 8 of them
    (`recompile_limit`), which a model mixing widths would reach. None where compiling failed
    (this time or before)."""
    global _failure
    if _failure is not None:
        return None
    try:
        if key not in _compiled:
            code = _summed.__code__.replace(co_name=f"_summed_{len(_compiled)}")
            _compiled[key] = torch.compile(types.FunctionType(code, globals()), dynamic=False, fullgraph=True)
        return _compiled[key](*args)
    except Exception as e:  # no C++ compiler (BackendCompilerFailed), a recompile limit, an unsupported Python
        cause = getattr(e, "inner_exception", e)
        message = str(cause).strip()
        _failure = f"{type(cause).__name__}: {message.splitlines()[0] if message else ''}"
        warnings.warn(f"compress: the fused CPU matmul could not be compiled ({_failure}); quantized layers "
                      "run the reference path (dequantize, then matmul) on CPU", RuntimeWarning, stacklevel=3)
        return None


def _dynamic(*tensors: torch.Tensor | None, dims: tuple[tuple[int, ...], ...]) -> tuple:
    """The tensors, their sizes along `dims` marked dynamic (M, N, the number of groups): one
    compilation serves every shape, while what the vectorized loop spans stays static. A size of
    1 stays specialized (Dynamo's rule), which makes a single row of x a variant of its own."""
    for t, ds in zip(tensors, dims):
        for d in ds if t is not None else ():
            torch._dynamo.maybe_mark_dynamic(t, d)
    return tensors


def _split(k: int, group_size: int) -> list[tuple[int, int, int, int]]:
    """(first column, columns, group span, first group) of the whole groups, then of a shorter
    last group if there is one."""
    span = min(group_size, k)
    whole = k // span
    return [(0, whole * span, span, 0)] + ([(whole * span, k - whole * span, k - whole * span, whole)]
                                            if whole * span < k else [])


def matmul(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
           group_size: int, in_features: int) -> torch.Tensor | None:
    """x [M, K] @ dequantize_words(words, ...).T -> [M, N] in x's dtype (words int32 [N, n_words],
    scales [n_groups, N], zeros uint8 [n_groups, N] or None; a format `applies` takes); None when
    compiling has failed (the caller runs the reference)."""
    m, n, cpb = x.shape[0], words.shape[0], 8 // bits
    code_bytes, parts = words.view(torch.uint8), []
    for first, cols, span, g0 in _split(in_features, group_size):
        groups = cols // span
        codes = code_bytes[:, first // cpb:(first + cols) // cpb].view(n, groups, span // cpb)  # a view
        planes = x[:, first:first + cols].float().reshape(m, groups, span // cpb, cpb).permute(0, 3, 1, 2)
        parts.append(_dynamic(planes.contiguous(), codes, scales[g0:g0 + groups],
                              None if zeros is None else zeros[g0:g0 + groups], dims=((0, 2), (0, 1), (0, 1), (0, 1))))
    key = ("dense", bits, zeros is None, m == 1, scales.dtype, *(part[1].shape[2] for part in parts))
    y = _run(key, _grouped_matmul, parts, bits)
    return None if y is None else y.to(x.dtype)


def sp24_applies(bits: int, group_size: int, in_features: int) -> bool:
    """Whether the fused path reads this 2:4 format: 2, 4 or 8-bit kept codes in groups (a shorter
    last one included) of whole 8-column units."""
    span = min(group_size, in_features)
    return bits in (2, 4, 8) and span > 0 and span % 8 == 0 and in_features % 8 == 0


def sp24_matmul(x: torch.Tensor, words: torch.Tensor, positions: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor | None, bits: int, group_size: int, in_features: int) -> torch.Tensor | None:
    """x [M, K] @ dequantize_sp24_words(words, positions, ...).T -> [M, N] in x's dtype (cuda/layout.py:
    words int32 [N, n_words] of the K / 2 kept codes, positions int32 [N, n_pos_words] of their
    slots; a format `sp24_applies` takes); None when compiling has failed."""
    m, n = x.shape[0], words.shape[0]
    # A unit is 8 columns, 4 kept codes, at 2 and 8 bits (one slot byte, one code byte or int32);
    # at 4 bits their codes would take 16-bit lanes, so a unit is 4 columns, 2 kept codes: a code
    # byte and, split off the stored bytes (a small copy per call), a slot nibble.
    kept = 2 if bits == 4 else 4
    code_bytes, slot_bytes, parts = words.view(torch.uint8), positions.view(torch.uint8), []
    for first, cols, span, g0 in _split(in_features, group_size):
        groups, units = cols // span, span // (2 * kept)
        codes = code_bytes[:, first * bits // 16:(first + cols) * bits // 16]  # K / 2 kept codes of `bits`
        codes = (codes.view(torch.int32) if bits == 8 else codes).view(n, groups, units)
        slots = slot_bytes[:, first // 8:(first + cols) // 8]  # 2 bits per kept code: a byte per 8 columns
        if bits == 4:
            slots = torch.stack([slots & 15, slots >> 4], dim=-1)
        planes = x[:, first:first + cols].float().reshape(m, groups, units, kept // 2, 4).permute(0, 3, 4, 1, 2)
        parts.append(_dynamic(planes.contiguous(), codes, slots.reshape(n, groups, units), scales[g0:g0 + groups],
                              None if zeros is None else zeros[g0:g0 + groups],
                              dims=((0, 3), (0, 1), (0, 1), (0, 1), (0, 1))))
    key = ("sp24", bits, zeros is None, m == 1, scales.dtype, *(part[1].shape[2] for part in parts))
    y = _run(key, _sp24_grouped_matmul, parts, bits, kept)
    return None if y is None else y.to(x.dtype)
