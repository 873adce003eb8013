"""Few-row matmuls of integer weights on CPU with the dequantization fused in: C++ kernels
(csrc/cpu_int_matmul.cpp, built on first use by cpu_native.py, called through ctypes).

Where PyTorch's packed CPU kernels do not serve (fp32 and fp16 activations, where they are 5-25x
slower than a dense matmul, cpu_packed.py; formats they refuse), the reference path dequantizes
the whole weight to fp32 on every call before it multiplies: decoding a token at a time, that
writes and reads 4 bytes per weight for every token, and a 4-bit model decodes slower than the
float one. Here one pass reads the codes where they are and multiplies them into x:

    y[m, n] = sum_g scale[g, n] * sum_{k in g} (code[n, k] - zero[g, n]) * x[m, k]

in fp32, the reference's values up to the order of the sums. The kernels read the kernels' 32-bit
words (cuda/layout.py) a vector at a time against x transposed into planes; for 2:4 weights each
kept code's x is picked from its group of 4 by its slot (with AVX-512 a permute of x as it lies,
16 kept values a vector; elsewhere selects from planes). 2:4 weights of float values
(SparseLinear) get the same without the codes: the reference places them into a dense weight on
every call, 14-40x slower than a dense matmul. A call costs a few
microseconds beyond its arithmetic: torch.compile's code for the same loops, which served here
before, cost tens of microseconds of dispatch per call, more than a whole matmul at smollm2-135m's
sizes. Where the kernels cannot be built (no C++ compiler), the path turns itself off with one
warning and the reference runs.
"""

from __future__ import annotations

import abc
import warnings

import torch

from . import cpu_native

# Largest M the dense kernel serves under "auto": its work grows with M (each decoded weight meets
# 8 rows of x at a time), while beyond it the weight is dequantized once (cpu_dequantize.py) and
# multiplied by PyTorch's dense matmul. On this project's 2-core CPU (fp32, 4-bit g64,
# benchmarks/results/cpu-2026-12-04/cpu_kernels_dequant.jsonl) the two are about even at M = 16
# on smollm2-135m's shapes (576 x 576: 0.26 against 0.24 ms) and the kernel is ahead at 4096^2
# (7.3 against 11.5 ms). 8-bit, asymmetric 4-bit g128 and 2-bit codes still lead at M = 32 on
# most shapes (8-bit 576 x 576: 0.33 against 0.40 ms in cpu_kernels_thresholds.jsonl), by less
# than this shared machine varies between runs; one bound serves every width.
MAX_M = 16
# The same for 2:4 weights (codes or float values), by the kernel that serves them (sp24_max_m). With
# AVX-512, float values and codes in groups of 32 columns or more take 16 kept values a vector,
# each one's x by a permute, and lead the dequantization up to M = 32 (fp32, 4-bit g128 / fp32
# values, cpu-2026-12-05/cpu_kernels_thresholds_sp24.jsonl: M = 32 576 x 576 0.21 / 0.15 against
# 0.23 / 0.21 ms, 4096^2 8.7 / 7.7 against 16.3 / 17.5; M = 64 behind or even on smollm2-135m's
# shapes, 0.39 / 0.30 against 0.32 / 0.31). Shorter groups pick x from planes by selects, which
# were even with it at M = 16 (cpu-2026-12-04/cpu_kernels_thresholds.jsonl). Without AVX-512 (the
# AVX2 build on this machine, MKL held to AVX2: cpu_kernels_thresholds_avx2.txt) the selects lose
# from M = 16 on (576 x 576 0.39 / 0.35 against 0.31 / 0.18 ms) and win at 8 (0.20 / 0.17
# against 0.29 / 0.17), while the dense kernel is still even at 16 (0.17 against 0.18).
SP24_MAX_M = {"lanes": 32, "planes": 16, "narrow": 8}

SCALE_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/cpu_int_matmul.cpp: ScaleKind
# Activations "auto" gives the kernels (fp32 inside; float64 keeps the reference's precision)
ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def applies(bits: int, group_size: int, in_features: int) -> bool:
    """Whether the dense kernel reads this format: 2, 4 or 8-bit words (cuda/layout.py) whose groups
    (a shorter last one included) fill whole 32-bit words."""
    span, per_word = min(group_size, in_features), 32 // bits if bits in (2, 4, 8) else 0
    return per_word > 0 and span > 0 and span % per_word == 0 and in_features % per_word == 0


def sp24_max_m(span: int | None = None) -> int:
    """The most rows of x "auto" gives the 2:4 kernel of codes in groups of `span` columns (float
    values: None) in this build (SP24_MAX_M); 0 where the kernels cannot be built."""
    lib = library()
    if lib is None:
        return 0
    if lib.vector_words() != 16:  # ctypes' default signature: int, no arguments
        return SP24_MAX_M["narrow"]
    return SP24_MAX_M["lanes" if span is None or span % 32 == 0 else "planes"]


def available() -> bool:
    """Whether the kernels can run: they have not failed to build in this process (then
    `failure()` says why)."""
    return cpu_native.failure() is None


def failure() -> str | None:
    """Why the kernels cannot run, or None where they can."""
    return cpu_native.failure()


def library():
    """The kernel library (the fused matmuls and cpu_dequantize.py's functions), or None where it
    cannot be built (warned about once)."""
    known = cpu_native.failure() is not None
    lib = cpu_native.library()
    if lib is None and not known:
        warnings.warn(f"compress: the C++ CPU kernels could not be built ({cpu_native.failure()}); quantized "
                      "and 2:4 layers run the reference path on CPU", RuntimeWarning, stacklevel=4)
    return lib


def _rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x [..., K] as the kernels read it: fp32, contiguous (M = x.numel() / K rows), on the CPU."""
    if x.dim() == 0 or x.shape[-1] != in_features or not x.is_cpu:
        raise ValueError(f"the fused CPU matmul takes CPU activations [..., {in_features}], not {x.device.type} "
                         f"activations {tuple(x.shape)}")
    return x.float().contiguous()


def checked_weight(words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, codes: int, bits: int,
                   group_size: int, in_features: int, fits: bool) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Scales and zeros as the kernels read them, and the group span, once the format (`fits`:
    applies or sp24_applies) and the sizes are checked: the kernels trust them, and a mismatch
    would read past the tensors. `codes`: codes a row of words holds (K, or K / 2 for 2:4)."""
    if not fits:
        raise ValueError(f"the C++ CPU kernels do not read {bits}-bit codes in groups of {group_size} "
                         f"(K = {in_features}); use kernel 'auto'")
    n, span = words.shape[0], min(group_size, in_features)
    groups = -(-in_features // span)
    if (words.dtype != torch.int32 or words.dim() != 2 or words.stride(1) != 1 or words.shape[1] * 32 // bits < codes
            or scales.shape != (groups, n) or (zeros is not None and (zeros.shape != (groups, n)
                                                                     or zeros.dtype != torch.uint8))
            or not words.is_cpu or not scales.is_cpu or (zeros is not None and not zeros.is_cpu)):
        raise ValueError(f"the C++ CPU kernels got words {tuple(words.shape)} ({words.dtype}, {words.device}), "
                         f"scales {tuple(scales.shape)}, zeros {None if zeros is None else tuple(zeros.shape)} "
                         f"({None if zeros is None else zeros.dtype}) for {codes} {bits}-bit codes a row of K = "
                         f"{in_features} in groups of {group_size}; expected {groups} x {n} scales and uint8 zeros")
    scales = scales.contiguous() if scales.dtype in SCALE_KINDS else scales.float().contiguous()
    return scales, None if zeros is None else zeros.contiguous(), span


def _output(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.empty(*x.shape[:-1], n, dtype=torch.float32)  # fp32 whatever the default dtype


def _as(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y (fp32) in x's dtype; no call where it is fp32 already (a no-op `to` costs a microsecond,
    and decoding calls each layer once a token)."""
    return y if dtype == torch.float32 else y.to(dtype)


class Fused(abc.ABC):
    """A weight checked once for one of the fused kernels, with the kernel's arguments: calling it
    skips the checks and conversions, which cost 6 us a call again (a third of the kernel's own
    time at smollm2-135m's 192 x 576 layers). QuantLinear, SparseQuantLinear and SparseLinear keep
    one from `prepack` for the calls that take it directly (ops.fused_linear). The tensors'
    pointers are read per call, so a deep copy of the module reads its own."""

    out_features: int
    in_features: int
    max_m: int  # the most rows of x "auto" gives it (MAX_M, sp24_max_m)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [..., K] @ the weight.T -> [..., N] in x's dtype; None when the kernels could not be
        built (warned once; the caller runs the reference)."""
        lib = library()
        if lib is None:
            return None
        x32 = _rows(x, self.in_features)
        y = _output(x, self.out_features)
        if y.numel():
            self._run(lib, x32, y)
        return _as(y, x.dtype)

    @abc.abstractmethod
    def _run(self, lib, x: torch.Tensor, y: torch.Tensor) -> None:
        """y fp32 [..., N] = x fp32 [..., K] (both contiguous) @ the weight.T, by the kernel."""


class FusedWeight(Fused):
    """A dense weight: words int32 [N, n_words], scales [n_groups, N], zeros uint8 [n_groups, N] or
    None, in a format `applies` takes (else a ValueError)."""

    max_m = MAX_M

    def __init__(self, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                 group_size: int, in_features: int) -> None:
        scales, zeros, span = checked_weight(words, scales, zeros, in_features, bits, group_size, in_features,
                                             applies(bits, group_size, in_features))
        self._tensors = (words, scales, zeros)
        self.out_features, self.in_features = words.shape[0], in_features
        self._format = (SCALE_KINDS[scales.dtype], bits, span)

    def _run(self, lib, x: torch.Tensor, y: torch.Tensor) -> None:
        (words, scales, zeros), (kind, bits, span) = self._tensors, self._format
        lib.int_matmul(x.data_ptr(), x.numel() // self.in_features, self.in_features, words.data_ptr(),
                       words.shape[0], words.stride(0), scales.data_ptr(), kind,
                       None if zeros is None else zeros.data_ptr(), bits, span, y.data_ptr(), torch.get_num_threads())


def matmul(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
           group_size: int, in_features: int) -> torch.Tensor | None:
    """x [..., K] @ dequantize_words(words, ...).T -> [..., N] in x's dtype (FusedWeight's tensors); None
    when the kernel could not be built (it warned once; the caller runs the reference)."""
    if library() is None:
        return None
    return FusedWeight(words, scales, zeros, bits, group_size, in_features)(x)


def sp24_applies(bits: int, group_size: int, in_features: int) -> bool:
    """Whether the 2:4 kernel reads this format: 2, 4 or 8-bit kept codes whose groups (a shorter
    last one included) fill whole 32-bit code words (64 / bits columns)."""
    span, columns = min(group_size, in_features), 64 // bits if bits in (2, 4, 8) else 0
    return columns > 0 and span > 0 and span % columns == 0 and in_features % columns == 0


def check_positions(positions: torch.Tensor, rows: int, kept: int) -> None:
    if (positions.dtype != torch.int32 or positions.dim() != 2 or positions.stride(1) != 1
            or positions.shape[0] != rows or positions.shape[1] * 16 < kept or not positions.is_cpu):
        raise ValueError(f"the C++ CPU kernels got positions {tuple(positions.shape)} ({positions.dtype}) for "
                         f"{rows} rows of {kept} kept values")


def checked_sp24(words: torch.Tensor, positions: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bits: int, group_size: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """checked_weight for 2:4 codes (the K / 2 kept codes a row, a format `sp24_applies` takes),
    their positions checked too."""
    checked = checked_weight(words, scales, zeros, in_features // 2, bits, group_size, in_features,
                             sp24_applies(bits, group_size, in_features))
    check_positions(positions, words.shape[0], in_features // 2)
    return checked


class FusedSp24Weight(Fused):
    """2:4 codes (cuda/layout.py): words int32 [N, n_words] of the K / 2 kept codes, positions int32
    [N, n_pos_words] of their slots, scales and zeros as FusedWeight's, in a format `sp24_applies`
    takes (else a ValueError)."""

    def __init__(self, words: torch.Tensor, positions: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, bits: int, group_size: int, in_features: int) -> None:
        scales, zeros, span = checked_sp24(words, positions, scales, zeros, bits, group_size, in_features)
        self.max_m = sp24_max_m(span)
        self._tensors = (words, positions, scales, zeros)
        self.out_features, self.in_features = words.shape[0], in_features
        self._format = (SCALE_KINDS[scales.dtype], bits, span)

    def _run(self, lib, x: torch.Tensor, y: torch.Tensor) -> None:
        (words, positions, scales, zeros), (kind, bits, span) = self._tensors, self._format
        lib.sp24_int_matmul(x.data_ptr(), x.numel() // self.in_features, self.in_features, words.data_ptr(),
                            words.shape[0], words.stride(0), positions.data_ptr(), positions.stride(0),
                            scales.data_ptr(), kind, None if zeros is None else zeros.data_ptr(), bits, span,
                            y.data_ptr(), torch.get_num_threads())


def sp24_matmul(x: torch.Tensor, words: torch.Tensor, positions: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor | None, bits: int, group_size: int, in_features: int) -> torch.Tensor | None:
    """x [..., K] @ dequantize_sp24_words(words, positions, ...).T -> [..., N] in x's dtype
    (FusedSp24Weight's tensors); None when the kernel could not be built."""
    if library() is None:
        return None
    return FusedSp24Weight(words, positions, scales, zeros, bits, group_size, in_features)(x)


def sp24_float_applies(values_dtype: torch.dtype, in_features: int) -> bool:
    """Whether the 2:4 kernel of float values (SparseLinear) reads these: fp32, fp16 or bf16 values."""
    return values_dtype in SCALE_KINDS and in_features % 4 == 0 and in_features > 0


def check_values(values: torch.Tensor, positions: torch.Tensor, in_features: int) -> None:
    """Refuse 2:4 values and positions the kernels cannot read: values [N, K / 2] fp32, fp16 or
    bf16 on the CPU, rows contiguous, and positions for their N rows."""
    if (not sp24_float_applies(values.dtype, in_features) or values.dim() != 2 or values.stride(1) != 1
            or values.shape[1] * 2 != in_features or not values.is_cpu):
        raise ValueError(f"the C++ CPU kernels got 2:4 values {tuple(values.shape)} ({values.dtype}) for K = "
                         f"{in_features}; they read fp32, fp16 or bf16 values [N, K / 2] on the CPU")
    check_positions(positions, values.shape[0], in_features // 2)


class FusedSp24Values(Fused):
    """2:4 float values (SparseLinear): values [N, K / 2] fp32, fp16 or bf16, positions int32 [N,
    n_pos_words] of their slots (else a ValueError)."""

    def __init__(self, values: torch.Tensor, positions: torch.Tensor, in_features: int) -> None:
        check_values(values, positions, in_features)
        self.max_m = sp24_max_m()
        self._tensors = (values, positions)
        self.out_features, self.in_features = values.shape[0], in_features

    def _run(self, lib, x: torch.Tensor, y: torch.Tensor) -> None:
        values, positions = self._tensors
        lib.sp24_float_matmul(x.data_ptr(), x.numel() // self.in_features, self.in_features, values.data_ptr(),
                              SCALE_KINDS[values.dtype], values.stride(0), values.shape[0], positions.data_ptr(),
                              positions.stride(0), y.data_ptr(), torch.get_num_threads())


def sp24_float_matmul(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                      in_features: int) -> torch.Tensor | None:
    """x [..., K] @ dense_sp24_values(values, positions, ...).T -> [..., N] in x's dtype
    (FusedSp24Values's tensors); None when the kernel could not be built."""
    if library() is None:
        return None
    return FusedSp24Values(values, positions, in_features)(x)
