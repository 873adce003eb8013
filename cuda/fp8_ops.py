"""FP8 (e4m3) weights with one scale per output row (quant/layers.py: FP8Linear) as
`torch.library` ops, like the integer formats' (ops.py): traceable by torch.compile (fake
implementations), x's gradient passed on (op_library.differentiable), calls without grad mode
through a twin without an autograd kernel, eager CPU calls without the op's dispatch.

    compress::fp8_linear(x, weight, scales, kernel)
        x [..., K] @ (weight.float() * scales).to(x.dtype).T -> [..., N] in x's dtype;
        weight float8_e4m3fn [N, K], scales [N, 1] (fp32, fp16 or bf16)
    compress::dequantize_fp8(weight, scales, dtype, kernel)
        the dense weight [N, K] in `dtype`

`kernel`: "reference" (PyTorch's conversion, then a matmul: the semantics); "cpu_fused" (the
fused C++ matmul, cpu_fp8.py; CPU activations, which with 16-bit activations skips the
reference's rounding of the weight to their dtype); "triton" (triton_fp8.py: the fastest of our GEMV
and our dequantization + cuBLAS for the shape, measured once; CUDA, or the CPU interpreter under
TRITON_INTERPRET=1); "auto": on CUDA "triton", on CPU the fused matmul for up to cpu_fp8.MAX_M
rows of fp32 x, else the weight dequantized in C++ a block of rows at a time, rounded to x's dtype
as the reference rounds it, and PyTorch's matmul; elsewhere the reference.
"""

from __future__ import annotations

import torch

from . import cpu_fp8, cpu_fused
from .op_library import define, differentiable
from .ops import _route
from .tuning import interpreting

KERNELS = ("auto", "reference", "triton", "cpu_fused")


def reference_weight(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K]: each e4m3 value times its row's scale in fp32, then `dtype`."""
    return (weight.float() * scales.float().reshape(-1, 1)).to(dtype)


def _check(kernel: str, weight: torch.Tensor, scales: torch.Tensor, x: torch.Tensor | None = None) -> None:
    """One line for what the ops cannot take: an unknown kernel, a weight other than
    float8_e4m3fn [N, K], other than N scales on its device, x other than [..., K] there."""
    if kernel not in KERNELS:
        raise ValueError(f"fp8 weights run kernel {', '.join(map(repr, KERNELS))}, not '{kernel}'")
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise ValueError(f"the fp8 ops take a float8_e4m3fn weight [N, K], not {weight.dtype} {tuple(weight.shape)}")
    if scales.numel() != weight.shape[0] or scales.device != weight.device:
        raise ValueError(f"the fp8 ops take one scale per row of the {tuple(weight.shape)} weight on its device "
                         f"({weight.device}), not {scales.numel()} scales on {scales.device}")
    if x is not None and (x.dim() == 0 or x.shape[-1] != weight.shape[1] or x.device != weight.device):
        raise ValueError(f"fp8_linear takes activations [..., {weight.shape[1]}] on {weight.device}, not "
                         f"{tuple(x.shape)} on {x.device}")


def _use_triton(device: torch.device, kernel: str) -> bool:
    """Whether the Triton kernels run: "auto" on CUDA, or forced (an error where they cannot)."""
    if kernel == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError("kernel 'triton' needs a CUDA device (or TRITON_INTERPRET=1); use kernel 'auto'")
    return kernel == "triton" or kernel == "auto" and device.type == "cuda"


def _cpu_auto(weight: torch.Tensor, kernel: str) -> bool:
    """Whether "auto" runs the C++ kernels on this weight: on the CPU with rows contiguous, the
    kernels built."""
    return kernel == "auto" and weight.is_cpu and weight.stride(1) == 1 and cpu_fused.available()


def _fp8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, kernel: str) -> torch.Tensor:
    _check(kernel, weight, scales, x)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], n)
    if kernel == "cpu_fused":
        if not x.is_cpu:
            raise ValueError(f"kernel 'cpu_fused' takes CPU activations, not {x.device.type} ones; use kernel 'auto'")
        y = cpu_fp8.matmul(x, weight, scales)
        if y is None:
            raise ValueError(f"kernel 'cpu_fused' could not be built ({cpu_fused.failure()}); use kernel 'auto'")
        return y
    y = None
    if _use_triton(x.device, kernel):
        from .triton_fp8 import fp8_matmul  # imports triton: only where a kernel runs

        y = fp8_matmul(x2.contiguous(), weight, scales)
    elif _cpu_auto(weight, kernel) and x.dtype in cpu_fused.ACTIVATION_DTYPES:
        if x2.shape[0] <= cpu_fp8.MAX_M and x.dtype == torch.float32:  # 16-bit x: the reference rounds W to it
            y = cpu_fp8.matmul(x, weight, scales)
            if y is not None:
                return y  # [..., N] as x comes
        else:
            y = cpu_fp8.linear(x2, weight, scales)
    if y is None:
        y = torch.nn.functional.linear(x2, reference_weight(weight, scales, x.dtype))
    return y.reshape(*x.shape[:-1], n)


fp8_linear_op = define("fp8_linear(Tensor x, Tensor weight, Tensor scales, str kernel) -> Tensor", _fp8_linear,
                       lambda x, weight, *_: x.new_empty(*x.shape[:-1], weight.shape[0]))


def _dequantize_fp8(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, kernel: str) -> torch.Tensor:
    _check(kernel, weight, scales)
    if _use_triton(weight.device, kernel):
        from .triton_fp8 import dequantize

        return dequantize(weight, scales, dtype)
    w = cpu_fp8.dequantize(weight, scales, dtype) if _cpu_auto(weight, kernel) else None
    return reference_weight(weight, scales, dtype) if w is None else w


dequantize_fp8 = define("dequantize_fp8(Tensor weight, Tensor scales, ScalarType dtype, str kernel) -> Tensor",
                        _dequantize_fp8, lambda weight, scales, dtype, kernel: weight.new_empty(weight.shape,
                                                                                                dtype=dtype))

# x's gradient is grad @ the dense weight from the op above; trained scales get theirs through
# the reference.
fp8_linear_no_grad = differentiable(fp8_linear_op, lambda a, dtype: dequantize_fp8(a[0], a[1], dtype, a[2]),
                                    lambda a, dtype: reference_weight(a[0], a[1], dtype))


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """compress::fp8_linear (module docstring), the op's dispatch skipped where ops._direct allows."""
    op = _route(_fp8_linear, fp8_linear_op, fp8_linear_no_grad, x, weight, scales)
    return op(x, weight, scales, kernel)
