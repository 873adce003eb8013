"""Few-row matmuls of integer weights on CPU with the dequantization fused in.

Where PyTorch's packed CPU kernels do not serve (fp32 and fp16 activations, where they are 5-25x
slower than a dense matmul, cpu_packed.py; formats they refuse), the reference path dequantizes
the whole weight to fp32 on every call before it multiplies: decoding a token at a time, that
writes and reads 4 bytes per weight for every token, and a 4-bit model decodes slower than the
float one. Here one pass reads the codes where they are and multiplies them into x:

    y[m, n] = sum_g scale[g, n] * sum_{k in g} (code[n, k] - zero[g, n]) * x[m, k]

in fp32, the reference's values up to the order of the sums.

- Dense codes (`matmul`): a C++ kernel (csrc/cpu_int_matmul.cpp, built on first use by
  cpu_native.py) reads the kernels' 32-bit words (cuda/layout.py) a vector at a time against x
  transposed into planes, up to 8 rows of x per decoded weight. A call costs a few microseconds
  beyond its arithmetic; torch.compile's code for the same loop, which served here before, cost
  tens of microseconds of dispatch per call, more than the whole matmul at smollm2-135m's sizes.
- 2:4 codes (`sp24_matmul`): the same sums compiled by torch.compile (Inductor's C++ backend),
  each kept code's x picked from its group of 4 by its slot with selects. One compilation per
  variant (`_run`), a few seconds, cached on disk by Inductor; sizes are dynamic.

Both need a C++ compiler (and the second a Python that Dynamo supports): where building or
running one fails, it turns itself off with one warning and the reference runs.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable

import torch

from . import cpu_native

# Largest M the dense kernel serves under "auto": its work grows with M (each decoded weight meets
# 8 rows of x at a time), while the reference dequantizes once and then runs a dense matmul. On
# this project's 2-core CPU (benchmarks/results/cpu-2026-12-04, fp32, smollm2-135m's shapes) the
# kernel is ahead at M = 16 for every width (4-bit g64: 0.27-0.33 against 0.47-0.78 ms; 8-bit:
# 0.16-0.41 against 0.23-0.58; 2-bit g64: 0.30-0.75 against 0.52-1.00) and behind for some at
# M = 32 (8-bit 576 x 1536: 0.81 against 0.73; 2-bit: 0.45-1.44 against 0.41-1.35).
MAX_M = 16
# The same for 2:4 weights, whose reference (scatter the kept codes into a dense weight, then
# dequantize) is 3-7x slower than the dense one: at M = 32 the fused path still takes 0.3-0.75x
# of its time (1.14 against 1.60 ms at 576 x 576, 37 against 115 ms at 4096 x 4096, 4-bit g128).
SP24_MAX_M = 32

_SCALE_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/cpu_int_matmul.cpp: ScaleKind
_failure: str | None = None  # why compiling the 2:4 path failed, once it has: it is off from then on


def applies(bits: int, group_size: int, in_features: int) -> bool:
    """Whether the dense kernel reads this format: 2, 4 or 8-bit words (cuda/layout.py) whose groups
    (a shorter last one included) fill whole 32-bit words."""
    span, per_word = min(group_size, in_features), 32 // bits if bits in (2, 4, 8) else 0
    return per_word > 0 and span > 0 and span % per_word == 0 and in_features % per_word == 0


def available(sp24: bool = False) -> bool:
    """Whether the path can run: its kernel has not failed to build in this process (then
    `failure()` says why) and, for 2:4 weights, Dynamo supports this Python and is not off."""
    if not sp24:
        return cpu_native.failure() is None
    return _failure is None and torch._dynamo.is_dynamo_supported() and not torch._dynamo.config.disable


def failure(sp24: bool = False) -> str | None:
    """Why the path cannot run, or None where it can."""
    if not sp24:
        return cpu_native.failure()
    if _failure is None and not available(sp24=True):
        return "Dynamo is not supported on this Python or is disabled"
    return _failure


def matmul(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
           group_size: int, in_features: int) -> torch.Tensor | None:
    """x [M, K] @ dequantize_words(words, ...).T -> [M, N] in x's dtype (words int32 [N, n_words],
    scales [n_groups, N], zeros uint8 [n_groups, N] or None; a format `applies` takes); None when
    the kernel could not be built (it warned once; the caller runs the reference)."""
    known = cpu_native.failure() is not None
    lib = cpu_native.library()
    if lib is None:
        if not known:
            warnings.warn(f"compress: the fused CPU matmul could not be built ({cpu_native.failure()}); quantized "
                          "layers run the reference path (dequantize, then matmul) on CPU", RuntimeWarning,
                          stacklevel=3)
        return None
    m, n, span = x.shape[0], words.shape[0], min(group_size, in_features)
    groups = -(-in_features // span)
    # The kernel trusts its sizes: a mismatch here would read past the tensors.
    if (words.dtype != torch.int32 or words.stride(1) != 1 or words.shape[1] * 32 // bits < in_features
            or scales.shape != (groups, n) or (zeros is not None and zeros.shape != (groups, n))):
        raise ValueError(f"the fused CPU matmul got words {tuple(words.shape)} ({words.dtype}), scales "
                         f"{tuple(scales.shape)}, zeros {None if zeros is None else tuple(zeros.shape)} for {bits}-bit "
                         f"codes of K = {in_features} in groups of {group_size}; expected {groups} x {n} scales")
    x32 = x.float().contiguous()
    scales = scales.contiguous() if scales.dtype in _SCALE_KINDS else scales.float().contiguous()
    zeros = None if zeros is None else zeros.to(torch.uint8).contiguous()
    y = torch.empty(m, n)
    lib.int_matmul(x32.data_ptr(), m, in_features, words.data_ptr(), n, words.stride(0), scales.data_ptr(),
                   _SCALE_KINDS[scales.dtype], None if zeros is None else zeros.data_ptr(), bits, span, y.data_ptr(),
                   torch.get_num_threads())
    return y.to(x.dtype)


def _sp24_grouped_matmul(planes: torch.Tensor, codes: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor,
                         zeros: torch.Tensor | None, bits: int, kept: int) -> torch.Tensor:
    """One part of a 2:4 matmul, a unit of `kept` kept codes (2 or 4: kept / 2 groups of 4 columns)
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


def _summed(parts: list[tuple], bits: int, kept: int) -> torch.Tensor:
    """The sum of _sp24_grouped_matmul over the parts of one matmul (the whole groups and a shorter
    last one), in one compiled call: each call costs tens of microseconds of dispatch."""
    y = 0
    for part in parts:
        y = y + _sp24_grouped_matmul(*part, bits, kept)
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
        warnings.warn(f"compress: the fused CPU matmul of 2:4 weights could not be compiled ({_failure}); 2:4 "
                      "layers run the reference path (dequantize, then matmul) on CPU", RuntimeWarning, stacklevel=3)
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
    y = _run(key, parts, bits, kept)
    return None if y is None else y.to(x.dtype)
