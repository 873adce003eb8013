"""The integer-weight ops, `torch.library` ops defined by op_library.py (traceable by
torch.compile, capturable in CUDA graphs, x's gradient passed on), and `int_linear`,
`sp24_int_linear` and `sp24_linear`, the calls compressed modules make (or `cpu_packed_linear`,
where PyTorch's packed CPU weight serves the call and the kernels' words need not be derived).
Those calls run an op's implementation as a plain function where nothing needs the op
(`_direct`: eager, CPU, no gradient recorded), which saves its dispatch.

    compress::int_linear(x, words, scales, zeros, bits, group_size, in_features, kernel,
                         tinygemm_weight, tinygemm_scales)
        x [..., K] @ dequantize(words).T -> [..., N] in x's dtype
    compress::dequantize_int(words, scales, zeros, bits, group_size, in_features, dtype, kernel)
        the dense weight [N, K]
    compress::sp24_int_linear(x, words, positions, scales, zeros, bits, group_size, in_features, kernel)
        the same for a 2:4 sparse weight: `words` hold the K / 2 kept codes of each row, `positions`
        their slots (layout.dequantize_sp24_words); kernels "auto", "reference", "triton" or "cpu_fused"
    compress::dequantize_sp24_int(words, positions, scales, zeros, bits, group_size, in_features, dtype, kernel)
        its dense weight [N, K]
    compress::sp24_linear(x, values, positions, kernel, cusparselt)
        x [..., K] @ W.T for a 2:4 float weight: `values` [N, K / 2] the kept weights, `positions`
        their slots (layout.dense_sp24_values); `cusparselt` the same weight prepared for
        cuSPARSELt (cusparselt.pack) or None; kernels "auto", "reference", "triton" or "cpu_fused"
    compress::dense_sp24(values, positions, dtype, kernel)
        its dense weight [N, K]

The dense-weight ops give the matmuls' backward its W (x's gradient grad @ W), so a compiled
training step traces it; on CUDA they run the Triton dequantization kernel, on CPU under "auto"
the C++ one.

Semantics are those of layout.dequantize_words (the reference). `kernel` picks the
implementation per call: "reference"; "triton" (our Triton kernels or dequantize + cuBLAS,
whichever is faster for the shape; CUDA, or the CPU interpreter under TRITON_INTERPRET=1; an
error if the format is not supported); "cpu_packed" (PyTorch's packed CPU matmuls, bf16
activations); "cpu_fused" (dequantization fused into a C++ CPU matmul, for few rows of x:
cuda/cpu_fused.py); "auto": on CUDA the fastest of triton's choices and, where the weight was
prepared for it, PyTorch's tinygemm (cuda/tinygemm.py) or, for 2:4 float weights, cuSPARSELt
(cuda/cusparselt.py); on CPU cpu_packed where a packed weight was prepared for the activation
dtype (up to cpu_packed.MAX_M rows of x where the layer holds its words too), else cpu_fused up
to cpu_fused.MAX_M rows of x (sp24_max_m for 2:4 weights) where it reads the format, and beyond
that the weight dequantized in C++ a block of rows at a time and PyTorch's matmul
(cuda/cpu_dequantize.py: the reference's weight exactly); else the reference. On CPU under
"auto", dequantize_int and the gradient of x dequantize in C++ too.

Kernels differ from the reference by rounding only: the Triton kernels and cpu_fused accumulate
in fp32 (the Triton kernels with split-K in an order that varies from run to run); PyTorch's
packed kernels hold the scales and the zero term (8 - zero) * scale in bf16, a slightly
different function (relative output error about 3e-3 against the reference's 2e-3 in bf16,
measured on an H200).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import cpu_dequantize, cpu_fused, cpu_packed
from .layout import dense_sp24_values, dequantize_sp24_words, dequantize_words, supported
from .op_library import define, differentiable
from .tuning import interpreting

KERNELS = ("auto", "reference", "triton", "cpu_packed", "cpu_fused")


def _use_triton(device: torch.device, bits: int, group_size: int, in_features: int, kernel: str,
                sp24: bool = False) -> bool:
    if kernel == "triton":
        if not supported(bits, group_size, in_features, sp24):
            what = ("2:4 weights of 2, 4 or 8 bits with K and the groups multiples of 32" if sp24 else
                    "2, 4 and 8-bit weights in groups that are a multiple of 16")
            raise ValueError(f"kernel 'triton' supports {what} or per-channel, not {bits}-bit words in groups of "
                             f"{group_size} (K = {in_features}); use kernel 'auto'")
        if device.type != "cuda" and not interpreting():
            raise ValueError("kernel 'triton' needs a CUDA device (or TRITON_INTERPRET=1); use kernel 'auto'")
        return True
    return kernel == "auto" and device.type == "cuda" and supported(bits, group_size, in_features, sp24)


def _use_cpu_fused(x2: torch.Tensor, bits: int, group_size: int, in_features: int, kernel: str,
                   sp24: bool = False) -> bool:
    applies = (cpu_fused.sp24_applies if sp24 else cpu_fused.applies)(bits, group_size, in_features)
    if kernel == "cpu_fused":
        if x2.device.type != "cpu" or not applies:
            what = "2:4 weights of 2, 4 or 8-bit codes in groups of whole 32-bit code words" if sp24 else \
                "2, 4 or 8-bit words in groups of whole 32-bit words"
            raise ValueError(f"kernel 'cpu_fused' takes CPU activations and {what}, not {x2.device.type} "
                             f"activations with {bits}-bit codes in groups of {group_size} (K = {in_features}); "
                             "use kernel 'auto'")
        if not cpu_fused.available():
            raise _not_built()
        return True
    if not (kernel == "auto" and x2.is_cpu and x2.dtype in cpu_fused.ACTIVATION_DTYPES and cpu_fused.available()
            and applies):
        return False
    return x2.shape[0] <= (cpu_fused.sp24_max_m(min(group_size, in_features)) if sp24 else cpu_fused.MAX_M)


def _use_cpu_dequantize(device: torch.device, kernel: str, applies: bool) -> bool:
    """Whether "auto" dequantizes in C++ (cuda/cpu_dequantize.py) where the fused matmul did not
    serve: CPU tensors in a format the kernels read, the kernels built. The weight is the
    reference's bit for bit."""
    return kernel == "auto" and device.type == "cpu" and applies and cpu_fused.available()


def _not_built() -> ValueError:
    return ValueError(f"kernel 'cpu_fused' could not be built ({cpu_fused.failure()}); use kernel 'auto'")


def _unless_failed(y: torch.Tensor | None, kernel: str) -> torch.Tensor | None:
    """cpu_fused's result; None where building it failed just now (it warned), an error if forced."""
    if y is None and kernel == "cpu_fused":
        raise _not_built()
    return y


def _int_linear(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                bits: int, group_size: int, in_features: int, kernel: str,
                tinygemm_weight: torch.Tensor | None, tinygemm_scales: torch.Tensor | None) -> torch.Tensor:
    x2 = x.reshape(-1, in_features)
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], words.shape[0])
    if _use_triton(x.device, bits, group_size, in_features, kernel):
        from .int_matmul import IntWeight, int_matmul  # imports triton: only where a kernel runs

        library = None if kernel == "triton" or tinygemm_weight is None else (tinygemm_weight, tinygemm_scales)
        y = int_matmul(x2.contiguous(), IntWeight(words, scales, zeros, bits, group_size, in_features, library))
    else:
        if _use_cpu_fused(x2, bits, group_size, in_features, kernel):  # [..., N] as x comes: no reshape (1.5 us)
            y = _unless_failed(cpu_fused.matmul(x, words, scales, zeros, bits, group_size, in_features), kernel)
            if y is not None:
                return y
        y = None
        if _use_cpu_dequantize(x.device, kernel, cpu_fused.applies(bits, group_size, in_features)):
            y = cpu_dequantize.int_linear(x2, words, scales, zeros, bits, group_size, in_features)
        if y is None:
            y = torch.nn.functional.linear(x2, dequantize_words(words, scales, zeros, bits, group_size, in_features,
                                                                x.dtype))
    return y.reshape(*x.shape[:-1], words.shape[0])


int_linear_op = define("int_linear(Tensor x, Tensor words, Tensor scales, Tensor? zeros, int bits, int group_size, "
                       "int in_features, str kernel, Tensor? tinygemm_weight, Tensor? tinygemm_scales) -> Tensor",
                       _int_linear, lambda x, words, *_: x.new_empty(*x.shape[:-1], words.shape[0]))


def _dequantize_int(words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                    group_size: int, in_features: int, dtype: torch.dtype, kernel: str) -> torch.Tensor:
    if _use_triton(words.device, bits, group_size, in_features, kernel):
        from .int_matmul import IntWeight, dequantize

        return dequantize(IntWeight(words, scales, zeros, bits, group_size, in_features), dtype)
    w = None  # on CPU under "auto" dequantized in C++, else (or where it failed to build) the reference
    if _use_cpu_dequantize(words.device, kernel, cpu_fused.applies(bits, group_size, in_features)):
        w = cpu_dequantize.dequantize(words, scales, zeros, bits, group_size, in_features, dtype)
    return dequantize_words(words, scales, zeros, bits, group_size, in_features, dtype) if w is None else w


dequantize_int = define("dequantize_int(Tensor words, Tensor scales, Tensor? zeros, int bits, int group_size, "
                        "int in_features, ScalarType dtype, str kernel) -> Tensor", _dequantize_int,
                        lambda words, scales, zeros, bits, group_size, in_features, dtype, kernel:
                        words.new_empty(words.shape[0], in_features, dtype=dtype))


SP24_INT_KERNELS = ("auto", "reference", "triton", "cpu_fused")


def _sp24_int_linear(x: torch.Tensor, words: torch.Tensor, positions: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor | None, bits: int, group_size: int, in_features: int,
                     kernel: str = "auto") -> torch.Tensor:
    if kernel not in SP24_INT_KERNELS:
        raise ValueError(f"2:4 weights run kernel {', '.join(map(repr, SP24_INT_KERNELS))}, not '{kernel}'")
    x2 = x.reshape(-1, in_features)
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], words.shape[0])
    if _use_triton(x.device, bits, group_size, in_features, kernel, sp24=True):
        from .int_matmul import IntWeight, int_matmul

        y = int_matmul(x2.contiguous(), IntWeight(words, scales, zeros, bits, group_size, in_features,
                                                  positions=positions))
    else:
        if _use_cpu_fused(x2, bits, group_size, in_features, kernel, sp24=True):  # [..., N] as x comes
            y = _unless_failed(cpu_fused.sp24_matmul(x, words, positions, scales, zeros, bits, group_size,
                                                     in_features), kernel)
            if y is not None:
                return y
        y = None
        if _use_cpu_dequantize(x.device, kernel, cpu_fused.sp24_applies(bits, group_size, in_features)):
            y = cpu_dequantize.sp24_int_linear(x2, words, positions, scales, zeros, bits, group_size, in_features)
        if y is None:
            y = torch.nn.functional.linear(x2, dequantize_sp24_words(words, positions, scales, zeros, bits,
                                                                     group_size, in_features, x.dtype))
    return y.reshape(*x.shape[:-1], words.shape[0])


sp24_int_linear_op = define("sp24_int_linear(Tensor x, Tensor words, Tensor positions, Tensor scales, Tensor? zeros, "
                            "int bits, int group_size, int in_features, str kernel) -> Tensor",
                            _sp24_int_linear, lambda x, words, *_: x.new_empty(*x.shape[:-1], words.shape[0]))


def _dequantize_sp24_int(words: torch.Tensor, positions: torch.Tensor, scales: torch.Tensor,
                         zeros: torch.Tensor | None, bits: int, group_size: int, in_features: int, dtype: torch.dtype,
                         kernel: str) -> torch.Tensor:
    if _use_triton(words.device, bits, group_size, in_features, kernel, sp24=True):
        from .int_matmul import IntWeight, dequantize

        return dequantize(IntWeight(words, scales, zeros, bits, group_size, in_features, positions=positions), dtype)
    w = None
    if _use_cpu_dequantize(words.device, kernel, cpu_fused.sp24_applies(bits, group_size, in_features)):
        w = cpu_dequantize.sp24_dequantize(words, positions, scales, zeros, bits, group_size, in_features, dtype)
    return dequantize_sp24_words(words, positions, scales, zeros, bits, group_size, in_features, dtype) if w is None \
        else w


dequantize_sp24_int = define("dequantize_sp24_int(Tensor words, Tensor positions, Tensor scales, Tensor? zeros, "
                             "int bits, int group_size, int in_features, ScalarType dtype, str kernel) -> Tensor",
                             _dequantize_sp24_int,
                             lambda words, positions, scales, zeros, bits, group_size, in_features, dtype, kernel:
                             words.new_empty(words.shape[0], in_features, dtype=dtype))


SP24_KERNELS = ("auto", "reference", "triton", "cpu_fused")


def sp24_values_supported(values: torch.Tensor, in_features: int) -> bool:
    """Whether the Triton kernels take this 2:4 float weight: 16-bit values, K a multiple of 32."""
    return values.dtype in (torch.float16, torch.bfloat16) and in_features % 32 == 0


def _use_cpu_fused_sp24_values(x2: torch.Tensor, values: torch.Tensor, k: int, kernel: str) -> bool:
    """Whether a 2:4 weight of float values runs cpu_fused: forced (an error where it cannot), or
    "auto" on CPU for up to sp24_max_m() rows of 32 or 16-bit activations."""
    applies = cpu_fused.sp24_float_applies(values.dtype, k)
    if kernel == "cpu_fused":
        if x2.device.type != "cpu" or not applies:
            raise ValueError(f"kernel 'cpu_fused' takes CPU activations and 2:4 weights of fp32, fp16 or bf16 "
                             f"values, not {x2.device.type} activations with {values.dtype} values (K = {k}); "
                             "use kernel 'auto'")
        if not cpu_fused.available():
            raise _not_built()
        return True
    return (kernel == "auto" and x2.is_cpu and x2.dtype in cpu_fused.ACTIVATION_DTYPES and cpu_fused.available()
            and applies and x2.shape[0] <= cpu_fused.sp24_max_m())


def _use_triton_sp24_values(values: torch.Tensor, k: int, kernel: str, device: torch.device,
                            x_dtype: torch.dtype | None = None) -> bool:
    """Whether a 2:4 float weight runs the Triton kernels (of x of `x_dtype`, or its dequantization
    where None): forced (an error where they cannot), or "auto" on CUDA for the values they take."""
    fits = sp24_values_supported(values, k) and x_dtype in (None, values.dtype)
    if kernel != "triton":
        return kernel == "auto" and device.type == "cuda" and fits
    if not fits:
        x_part = "" if x_dtype is None else f", {x_dtype} activations"
        raise ValueError(f"kernel 'triton' takes 2:4 weights of 16-bit values with K a multiple of 32 and "
                         f"activations of the same dtype, not {values.dtype} values, K = {k}{x_part}; "
                         "use kernel 'auto'")
    if device.type != "cuda" and not interpreting():
        raise ValueError("kernel 'triton' needs a CUDA device (or TRITON_INTERPRET=1); use kernel 'auto'")
    return True


def _sp24_linear(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, kernel: str = "auto",
                 cusparselt: torch.Tensor | None = None) -> torch.Tensor:
    if kernel not in SP24_KERNELS:
        raise ValueError(f"2:4 weights run kernel {', '.join(map(repr, SP24_KERNELS))}, not '{kernel}'")
    n, k = values.shape[0], values.shape[1] * 2
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], n)
    if _use_triton_sp24_values(values, k, kernel, x.device, x.dtype):
        from .int_matmul import int_matmul, sp24_values as weight

        y = int_matmul(x2.contiguous(), weight(values, positions, None if kernel == "triton" else cusparselt))
    else:
        if _use_cpu_fused_sp24_values(x2, values, k, kernel):  # [..., N] as x comes
            y = _unless_failed(cpu_fused.sp24_float_matmul(x, values, positions, k), kernel)
            if y is not None:
                return y
        y = None
        if _use_cpu_dequantize(x.device, kernel, cpu_fused.sp24_float_applies(values.dtype, k)):
            y = cpu_dequantize.sp24_float_linear(x2, values, positions, k)
        if y is None:
            y = torch.nn.functional.linear(x2, dense_sp24_values(values, positions, k, x.dtype))
    return y.reshape(*x.shape[:-1], n)


sp24_linear_op = define("sp24_linear(Tensor x, Tensor values, Tensor positions, str kernel, "
                        "Tensor? cusparselt) -> Tensor", _sp24_linear,
                        lambda x, values, *_: x.new_empty(*x.shape[:-1], values.shape[0]))


def _dense_sp24(values: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, kernel: str) -> torch.Tensor:
    k = values.shape[1] * 2
    if _use_triton_sp24_values(values, k, kernel, values.device):
        from .int_matmul import dequantize, sp24_values

        return dequantize(sp24_values(values, positions), dtype)
    w = None
    if _use_cpu_dequantize(values.device, kernel, cpu_fused.sp24_float_applies(values.dtype, k)):
        w = cpu_dequantize.sp24_float_dense(values, positions, k, dtype)
    return dense_sp24_values(values, positions, k, dtype) if w is None else w


dense_sp24 = define("dense_sp24(Tensor values, Tensor positions, ScalarType dtype, str kernel) -> Tensor", _dense_sp24,
                    lambda values, positions, dtype, kernel:
                    values.new_empty(values.shape[0], values.shape[1] * 2, dtype=dtype))


# Gradients through each op (the op's arguments after x as `a`): x's is grad @ the dense weight
# from the op that dequantizes the format; trained scales or values get theirs through the
# reference. Each returns the op's twin for calls without grad mode (no autograd kernel to pass).
int_linear_no_grad = differentiable(int_linear_op, lambda a, dtype: dequantize_int(*a[:6], dtype, a[6]),
                                    lambda a, dtype: dequantize_words(*a[:6], dtype))
sp24_int_linear_no_grad = differentiable(sp24_int_linear_op,
                                         lambda a, dtype: dequantize_sp24_int(*a[:7], dtype, a[7]),
                                         lambda a, dtype: dequantize_sp24_words(*a[:7], dtype))
sp24_linear_no_grad = differentiable(sp24_linear_op, lambda a, dtype: dense_sp24(a[0], a[1], dtype, a[2]),
                                     lambda a, dtype: dense_sp24_values(a[0], a[1], a[0].shape[1] * 2, dtype))


@dataclass(frozen=True)
class CpuPacked:
    """A weight prepared for PyTorch's packed CPU matmuls at activation dtype `dtype`:
    int4 (weight = packed int4, scales = scales_and_zeros [n_groups, N, 2]) or int8
    (weight = int8 [N, K], scales = [N])."""

    weight: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype


def int_linear(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
               group_size: int, in_features: int, kernel: str = "auto", cpu: CpuPacked | None = None,
               tinygemm: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] (no bias) with the kernel `kernel` names (module docstring); `cpu` and
    `tinygemm` are the weight prepared for PyTorch's CPU and CUDA packed kernels, if it was."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel '{kernel}'; choose one of {', '.join(KERNELS)}")
    if kernel == "cpu_packed" and scales.requires_grad:
        raise ValueError("kernel 'cpu_packed' reads a packed copy of the weight, which the trained scales "
                         "do not reach: set_kernel('auto') while training them")
    if kernel == "cpu_packed" and (cpu is None or x.device.type != "cpu" or x.dtype != cpu.dtype):
        raise ValueError("kernel 'cpu_packed' needs a CPU weight prepacked for this activation dtype "
                         "(QuantLinear.prepack(dtype=torch.bfloat16): 3 or 4 bits in groups of 32-256 with "
                         "N % 16 == 0, or per-channel symmetric 5-8 bits with K % 16 == 0)")
    if cpu_packed_serves(kernel, cpu, x):
        return cpu_packed_linear(x, cpu, bits, group_size, in_features)
    op = _route(_int_linear, int_linear_op, int_linear_no_grad, x, words, scales, *(tinygemm or ()))
    return op(x, words, scales, zeros, bits, group_size, in_features, kernel, *(tinygemm or (None, None)))


def fused_linear(x: torch.Tensor, fused: cpu_fused.Fused | None, kernel: str,
                 dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> torch.Tensor | None:
    """x [..., K] @ the weight `fused` holds -> [..., N] where the op would run that fused CPU
    matmul under "auto" (activations of `dtypes` on the CPU, up to fused.max_m rows, a call
    `_direct` allows), with the weight's checks made once (the layers' prepack); else None, and
    the op decides."""
    if (fused is None or kernel != "auto" or x.dtype not in dtypes or x.shape[-1] != fused.in_features
            or not 0 < x.numel() <= fused.max_m * fused.in_features or not _direct(x)):
        return None
    return fused(x)  # [..., K] -> [..., N], no reshapes (a microsecond each)


def sp24_int_linear(x: torch.Tensor, words: torch.Tensor, positions: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor | None, bits: int, group_size: int, in_features: int,
                    kernel: str = "auto") -> torch.Tensor:
    """compress::sp24_int_linear (module docstring), the op's dispatch skipped where `_direct` allows."""
    op = _route(_sp24_int_linear, sp24_int_linear_op, sp24_int_linear_no_grad, x, words, positions, scales)
    return op(x, words, positions, scales, zeros, bits, group_size, in_features, kernel)


def sp24_linear(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, kernel: str = "auto",
                cusparselt: torch.Tensor | None = None) -> torch.Tensor:
    """compress::sp24_linear (module docstring), the op's dispatch skipped where `_direct` allows."""
    op = _route(_sp24_linear, sp24_linear_op, sp24_linear_no_grad, x, values, positions, cusparselt)
    return op(x, values, positions, kernel, cusparselt)


def _route(impl: Callable, op: torch._ops.OpOverload, no_grad_op: torch._ops.OpOverload, x: torch.Tensor,
           *weights: torch.Tensor | None) -> Callable:
    """What a call runs: the op's implementation itself where `_direct` allows; else the op, or
    without grad mode its twin that has no autograd kernel to pass (op_library.differentiable;
    under torch.compile, grad mode is guarded, so a graph traced under no_grad holds the twin)."""
    if _direct(x, *weights):
        return impl
    return op if torch.is_grad_enabled() else no_grad_op


def _direct(x: torch.Tensor, *weights: torch.Tensor | None) -> bool:
    """Whether a call runs the op's implementation as a plain function: eager, on a plain CPU
    tensor, with no gradient to record (of x or of `weights`, the op's other tensors). The
    op's dispatch costs about 6.5 us a call on this project's 2-core CPU (op_library.py; 12 us
    as a `custom_op`), a third of a 192 x 576 layer's whole call, 1.4 ms of a token decoded
    through smollm2-135m's 210 compressed layers. Calls that torch.compile, export, jit
    tracing, make_fx, vmap or functionalize see, calls under a torch function or dispatch mode
    (FlopCounterMode, a device context), tensor subclasses (fake tensors among them), other
    devices and calls that record a gradient go through the op: there the C++ kernels' raw
    pointers would bypass them."""
    if (type(x) is not torch.Tensor or not x.is_cpu or torch.compiler.is_compiling()
            or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active()):
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, *weights))


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x as nn.Linear's matmul takes it under autocast: a floating x (not fp64) in the autocast
    dtype where autocast is on for x's device, else x itself. Compressed layers call this first,
    so that under autocast they compute in, and return, the autocast dtype as nn.Linear does, at
    every M and kernel: without it, fp32 activations ran the fused matmuls and GEMVs in fp32 but
    the dequantize + matmul paths in the autocast dtype (a result dtype and rounding that changed
    with the number of rows)."""
    device = x.device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return x
    dtype = torch.get_autocast_dtype(device)
    return x.to(dtype) if x.is_floating_point() and x.dtype not in (dtype, torch.float64) else x


def cpu_packed_serves(kernel: str, cpu: CpuPacked | None, x: torch.Tensor, words_held: bool = True) -> bool:
    """Whether `int_linear` runs PyTorch's packed CPU matmul for x (then the words go unread):
    forced, or under "auto" for x of the packed weight's dtype, up to cpu_packed.MAX_M rows of x
    where the layer holds its words (`words_held`; widened codes keep only the packed weight) and
    the C++ dequantization that serves more rows has not failed to build."""
    if kernel not in ("auto", "cpu_packed") or cpu is None or x.device.type != "cpu" or x.dtype != cpu.dtype:
        return False
    return (kernel == "cpu_packed" or not words_held or not cpu_fused.available()
            or x.numel() // max(x.shape[-1], 1) <= cpu_packed.MAX_M)


def cpu_packed_linear(x: torch.Tensor, cpu: CpuPacked, bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """x [..., K] -> [..., N] through PyTorch's packed int4 (bits 4) or int8 CPU matmul."""
    x2 = x.reshape(-1, in_features).contiguous()
    if bits == 4:
        y = cpu_packed.int4_matmul(x2, cpu.weight, cpu.scales, group_size)
    else:
        y = cpu_packed.int8_matmul(x2, cpu.weight, cpu.scales)
    return y.reshape(*x.shape[:-1], y.shape[-1])
