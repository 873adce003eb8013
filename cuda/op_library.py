"""Defining the `compress::` ops on the dispatcher with as little Python per call as the
dispatcher allows (ops.py defines them).

`torch.library.custom_op` wraps each call in Python at two dispatch keys (its Autograd kernel,
with a context manager and a dataclass a call, and a backend wrapper that checks aliasing and
guards against dynamo): 9.0 us a call of a trivial op on this project's 2-core CPU, against 2.4
us for an op defined on a `torch.library.Library` with one Python kernel, and a compressed
model calls one op per layer per token. Here each op gets its schema (pt2-compliant), a fake
implementation for tracing, one implementation for every backend (CompositeExplicitAutograd:
the ops pick their kernels by device themselves; on CUDA run with their tensors' device current)
and, for the ops computing x @ W.T, a lean
Autograd kernel (`differentiable`): without a gradient to record it redispatches below autograd
at once (4.6 us a trivial call in all; calls without grad mode take a twin op that has none);
otherwise an autograd.Function gives x the gradient
grad @ W, W from another op, so torch.compile traces the backward too, and trained float weights
(scales, 2:4 values) theirs through the format's reference dequantization. A 192 x 576
4-bit layer's op call went from 34.4 to 28.2 us (its plain implementation: 21.6, ops.py:
`_direct`), its module's call recording x's gradient from 96 to 51 us.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.function import once_differentiable

LIBRARY = torch.library.Library("compress", "DEF")
_DEFINED: dict[str, tuple[str, Callable, Callable]] = {}  # name -> (schema, impl, fake), for no-grad twins


def define(schema: str, impl: Callable, fake: Callable) -> torch._ops.OpOverload:
    """compress::<name> from `schema` ("name(Tensor x, ...) -> Tensor"), run by `impl` on every
    device and by `fake` (shapes and dtypes only) under tracing; returns the op."""
    name = schema.split("(", 1)[0]
    LIBRARY.define(schema, tags=(torch.Tag.pt2_compliant_tag,))
    torch.library.register_fake(f"compress::{name}", fake, lib=LIBRARY)
    LIBRARY.impl(name, impl, "CompositeExplicitAutograd")
    LIBRARY.impl(name, _on_device_of_first_tensor(impl), "CUDA")
    _DEFINED[name] = (schema, impl, fake)
    return getattr(torch.ops.compress, name).default


def _on_device_of_first_tensor(impl: Callable) -> Callable:
    """`impl` run with its first tensor's CUDA device current, as ATen's CUDA kernels run under a
    device guard: Triton kernels launch on the current device and its stream, so a layer on
    cuda:1 called while cuda:0 was current (a model split over GPUs) ran its kernels on cuda:0."""
    def run(*args):
        with torch.cuda.device(next(a.device for a in args if isinstance(a, torch.Tensor))):
            return impl(*args)

    return run


class _Gradients(torch.autograd.Function):
    """y = op(x, *rest) with x's gradient grad [..., N] @ dense_weight(rest, grad.dtype) [N, K] (an
    op's fast W, which torch.compile traces); a float tensor of rest that requires a gradient (a
    layer's scales or 2:4 values being trained) gets dW = grad.T @ x [N, K] pulled back through
    reference_weight(rest) [N, K], the format's pure-PyTorch semantics (x is kept for that only)."""

    @staticmethod
    def forward(ctx, keyset, op, dense_weight, reference_weight, x, *rest):
        ctx.op, ctx.weights = op, (dense_weight, reference_weight)
        ctx.tensor_at = [i for i, a in enumerate(rest) if isinstance(a, torch.Tensor)]
        ctx.trained = [i for i in ctx.tensor_at if ctx.needs_input_grad[5 + i]]
        ctx.save_for_backward(x if ctx.trained else None, *(rest[i] for i in ctx.tensor_at))
        ctx.rest = [None if isinstance(a, torch.Tensor) else a for a in rest]
        return op.redispatch(keyset & torch._C._after_autograd_keyset, x, *rest)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        dense_weight, reference_weight = ctx.weights
        x, *tensors = ctx.saved_tensors
        rest = list(ctx.rest)
        for i, t in zip(ctx.tensor_at, tensors):
            rest[i] = t
        x_grad = grad @ dense_weight(rest, grad.dtype) if ctx.needs_input_grad[4] else None
        rest_grads = [None] * len(rest)
        if ctx.trained:
            with torch.enable_grad():
                for i in ctx.trained:
                    rest[i] = rest[i].detach().requires_grad_()
                w = reference_weight(rest, torch.float32)  # [N, K]
                w_grad = grad.reshape(-1, w.shape[0]).float().T @ x.reshape(-1, w.shape[1]).float()
                leaves = [rest[i] for i in ctx.trained]
                trained = torch.autograd.grad(w, leaves, w_grad, allow_unused=True) if w.requires_grad \
                    else [None] * len(leaves)
            for i, g in zip(ctx.trained, trained):
                if g is None:  # e.g. tinygemm's copy of the scales: a cache of W, not a weight of its own
                    name = ctx.op._schema.arguments[1 + i].name
                    raise ValueError(f"{ctx.op}: '{name}' is a layout derived from the weight and gets no gradient; "
                                     "make the weight's own tensors (scales, values) require one instead")
                rest_grads[i] = g
        return None, None, None, None, x_grad, *rest_grads


def differentiable(op: torch._ops.OpOverload, dense_weight: Callable,
                   reference_weight: Callable) -> torch._ops.OpOverload:
    """Give `op` (x [..., K], *rest) -> x @ W.T [..., N] its Autograd kernel: x's gradient is
    grad @ dense_weight(rest, dtype) (an op's dense W [N, K], traceable); a float tensor of rest
    requiring one gets its gradient through reference_weight(rest, dtype), the same W in pure
    PyTorch (_Gradients). A compressed layer's weights are frozen buffers unless made to require
    gradients; an adapter trained on top of it needs x's.

    Returns the op's twin for calls made without grad mode, compress::<name>_no_grad: the same
    schema, implementation and fake, and no Autograd kernel of ours, so PyTorch's C++ fallback
    passes such calls straight on where the Python kernel above costs a redispatch: a 576 x 576
    int4 layer's op call under no_grad took 40.3-40.4 us, its twin's 35.6-37.3 (this project's
    2-core CPU; the C++ kernel called directly: 26.6-27.0), in every op call a compiled graph
    traced under no_grad makes (and on CUDA, every eager one)."""

    def autograd_kernel(keyset, x, *rest):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(x, *rest):
            return _Gradients.apply(keyset, op, dense_weight, reference_weight, x, *rest)
        return op.redispatch(keyset & torch._C._after_autograd_keyset, x, *rest)

    LIBRARY.impl(op._opname, autograd_kernel, "Autograd", with_keyset=True)
    schema, impl, fake = _DEFINED[op._opname]
    return define(f"{op._opname}_no_grad{schema[len(op._opname):]}", impl, fake)
