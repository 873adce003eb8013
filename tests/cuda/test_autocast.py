"""Compressed layers under autocast compute in, and return, the autocast dtype as nn.Linear does,
at every number of rows and kernel (ops.autocast_input). Before, fp32 activations ran the fused
matmuls in fp32 but the dequantize + matmul paths in bf16, and the fp32 bias promoted the result
back to fp32: a dtype and a rounding that changed with M."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.quant.fp8 import FP8Config
from compress.quant.nf4 import NF4Config
from compress.quant.rtn import RTNConfig

from .test_cpu_fused import sparse_layer, sparse_quant_layer

BOUND = 1e-2  # relative error against nn.Linear of the same weight under autocast: measured up to 3.6e-3

BUILDERS = {  # kind -> a CPU layer of that kind, K = 256, with a bias
    "int4": lambda dense: RTNConfig(bits=4, group_size=64).build().compress("l", dense),
    "int3 asym": lambda dense: RTNConfig(bits=3, group_size=64, symmetric=False).build().compress("l", dense),
    "fp8": lambda dense: FP8Config().build().compress("l", dense),
    "nf4": lambda dense: NF4Config().build().compress("l", dense),
    "2:4": lambda _: sparse_layer(48, 256),
    "2:4 int4": lambda _: sparse_quant_layer(256, 4, 64),
}


def layer_of(kind: str) -> nn.Module:
    """A prepacked layer of `kind` (BUILDERS)."""
    torch.manual_seed(0)
    return BUILDERS[kind](nn.Linear(256, 48)).prepack()


def as_linear(layer: nn.Module) -> nn.Linear:
    """nn.Linear holding the compressed layer's weight and bias."""
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantized_weight())
        if layer.bias is not None:
            dense.bias.copy_(layer.bias.float())
    return dense


def use(layer: nn.Module, kernel: str) -> None:
    if hasattr(layer, "set_kernel"):
        layer.set_kernel(kernel)
    else:  # NF4Linear
        layer.kernel = kernel


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_layers_under_autocast_give_its_dtype_at_every_m_and_kernel(kind):
    layer = layer_of(kind)
    dense = as_linear(layer)
    for kernel in ("auto", "reference"):
        use(layer, kernel)
        for m in (1, 2, 40):  # the fused matmuls' rows and the dequantized weight's
            x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                y, ref = layer(x), dense(x)
            assert y.dtype == ref.dtype == torch.bfloat16, (kernel, m)
            err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
            assert err < BOUND, (kernel, m, err)
    use(layer, "auto")
    with torch.no_grad():
        assert layer(x).dtype == torch.float32  # autocast off: x's dtype


def test_training_through_a_layer_under_autocast_gives_fp32_gradients():
    """AMP training of something before a frozen compressed layer (an adapter, a prompt): x's
    gradient reaches the fp32 leaf in its dtype, as through nn.Linear."""
    layer = layer_of("int4")
    dense = as_linear(layer)
    grads = []
    for module in (layer, dense):
        x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(x)
        y.float().square().sum().backward()
        assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
        grads.append(x.grad)
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < BOUND


def test_compiled_layers_under_autocast_give_its_dtype():
    layer = layer_of("int4")
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(40, 256)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, eager = compiled(x), layer(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["int4", "fp8", "2:4", "2:4 int4"])
def test_cuda_layers_under_autocast_give_its_dtype_and_the_tuner_rejects_nothing(kind):
    """On CUDA the GEMVs returned fp32 for fp32 x and dequantize + cuBLAS bf16; the tuner compared
    the two and could reject the GEMV. Now every candidate sees bf16 x."""
    from compress.cuda import int_matmul, triton_fp8

    layer = layer_of(kind)
    dense = as_linear(layer).cuda()
    layer.cuda().prepack(torch.bfloat16)
    for m in (1, 16, 64):
        x = torch.randn(m, 256, device="cuda")
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            y, ref = layer(x), dense(x)
        assert y.dtype == torch.bfloat16
        assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < BOUND, m
    assert not int_matmul.TUNER.rejected and not triton_fp8.TUNER.rejected
