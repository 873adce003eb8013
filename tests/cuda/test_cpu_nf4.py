"""bitsandbytes' NF4 / FP4 weights on CPU: the C++ kernels (cuda/cpu_nf4.py) against bitsandbytes'
own dequantization, and NF4Linear's use of them."""

from __future__ import annotations

import copy
import platform

import pytest
import torch
from torch import nn

from compress.cuda import cpu_fused, cpu_nf4
from compress.quant.nf4 import NF4Config, NF4Linear

from .test_cpu_fused import _compiler_found, build_for

pytest.importorskip("bitsandbytes.functional")
pytestmark = pytest.mark.skipif(not _compiler_found(), reason="no C++ compiler: the CPU kernels cannot be built")

# ||y - ref|| / ||ref|| against the fp64 product of bitsandbytes' fp32 weight: the same weights (bit
# for bit) summed in another order, measured <= 1.9e-7 with AVX-512; a code at a time (one sum per
# row of x, K up to 1024) <= 4e-7.
REL_TOL = 1e-6


def nf4_layer(n: int, k: int, quant_type: str = "nf4", double_quant: bool = True, block_size: int = 64,
              bias: bool = False, seed: int = 0) -> NF4Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    config = NF4Config(quant_type=quant_type, double_quant=double_quant, block_size=block_size)
    return config.build().compress("l", linear)


def fused(layer: NF4Linear) -> cpu_nf4.FusedNf4:
    return cpu_nf4.FusedNf4(layer.weight_packed, layer.quant_map, cpu_nf4.absmax_fp32(layer.quant_state()),
                            layer.block_size, layer.out_features, layer.in_features)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("block_size,k", [(64, 576), (32, 96), (128, 256), (256, 256)])
def test_dequantization_is_bitsandbytes_weight_bit_for_bit(quant_type, double_quant, block_size, k):
    layer = nf4_layer(37, k, quant_type, double_quant, block_size)
    weights = fused(layer)
    assert torch.equal(weights.rows(0, 37), layer.dequantized_weight())
    assert torch.equal(weights.rows(5, 20), layer.dequantized_weight()[5:20])


@pytest.mark.parametrize("m", [1, 2, 3, 8, 9, 17])
@pytest.mark.parametrize("block_size,k", [(64, 576), (32, 96), (128, 1024)])
def test_fused_matmul_matches_bitsandbytes(m, block_size, k):
    """Rows of x 1 to 17 (up to 8 share each decoded row), blocks of 2 to 8 vectors."""
    layer = nf4_layer(24, k, block_size=block_size, seed=m)
    x = torch.randn(m, k)
    ref = x.double() @ layer.dequantized_weight().double().T
    y = fused(layer)(x)
    assert y.shape == (m, 24) and y.dtype == torch.float32 and rel_err(y, ref) < REL_TOL


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 instruction set levels")
def test_without_avx512_a_code_at_a_time_computes_the_same(monkeypatch):
    build_for("x86-64-v3", "avx2", monkeypatch)
    layer = nf4_layer(24, 1024, block_size=128)
    weights = fused(layer)
    assert torch.equal(weights.rows(0, 24), layer.dequantized_weight())
    x = torch.randn(3, 1024)
    assert rel_err(weights(x), x.double() @ layer.dequantized_weight().double().T) < REL_TOL


def test_layouts_and_sizes_it_cannot_read_are_refused():
    layer = nf4_layer(8, 96, block_size=64)  # blocks straddle rows: 96 is no multiple of 64
    assert not cpu_nf4.applies(96, 64) and cpu_nf4.applies(128, 64) and not cpu_nf4.applies(128, 8)
    with pytest.raises(ValueError, match=r"8 x 96 4-bit weight in blocks of 64"):
        fused(layer)
    good = nf4_layer(8, 128)
    with pytest.raises(ValueError, match=r"16 torch.float32 levels and 15 torch.float32 absmax"):
        cpu_nf4.FusedNf4(good.weight_packed, good.quant_map, cpu_nf4.absmax_fp32(good.quant_state())[:15], 64, 8,
                         128)


@pytest.mark.parametrize("shape", [(1, 128), (cpu_nf4.MAX_M, 128), (2, 8, 128), (cpu_nf4.MAX_M + 1, 128), (2, 35, 128)])
def test_nf4_linear_runs_the_kernels_once_prepacked(shape, monkeypatch):
    """Eager calls without a gradient: the fused matmul up to MAX_M rows of x, beyond that the C++
    weight in blocks of rows (16 rows here: several) through PyTorch's matmul; bitsandbytes'
    dequantization runs in neither, and each gives its result."""
    monkeypatch.setattr("compress.cuda.cpu_dequantize.BLOCK_FLOATS", 16 * 128)
    layer = nf4_layer(40, 128, bias=True, seed=shape[-2])
    x = torch.randn(shape)
    ref = nn.functional.linear(x.double(), layer.dequantized_weight().double(), layer.bias.double())
    layer.prepack(torch.float32)
    assert isinstance(layer._fused, cpu_nf4.FusedNf4)
    calls = []
    monkeypatch.setattr(NF4Linear, "dequantized_weight", lambda *a: pytest.fail("bitsandbytes dequantized"))
    for name in ("__call__", "linear"):
        real = getattr(cpu_nf4.FusedNf4, name)
        monkeypatch.setattr(cpu_nf4.FusedNf4, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (*shape[:-1], 40) and rel_err(y, ref) < REL_TOL
    assert calls == (["__call__"] if x.numel() <= cpu_nf4.MAX_M * 128 else ["linear"])


@pytest.mark.parametrize("weight_dtype,x_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                                  (torch.float16, torch.float32)])
def test_16_bit_weights_or_activations_round_as_bitsandbytes(weight_dtype, x_dtype):
    """bitsandbytes rounds the weight to its dtype, then to x's: the kernels' path takes the
    dequantized weight rounded so at every M (the fused matmul would skip it), so it gives the
    reference's output exactly."""
    torch.manual_seed(0)
    layer = NF4Config().build().compress("l", nn.Linear(128, 24, dtype=weight_dtype)).prepack(x_dtype)
    assert layer.weight_dtype == str(weight_dtype).removeprefix("torch.") and layer._fused is not None
    for m in (1, 20):
        x = torch.randn(m, 128).to(x_dtype)
        with torch.no_grad():
            y = layer(x)
            layer.kernel = "reference"
            ref = layer(x)
            layer.kernel = "auto"
        assert y.dtype == x_dtype and torch.equal(y, ref), (m, (y.float() - ref.float()).abs().max())


@pytest.mark.parametrize("m", [1, 40])
def test_a_layer_computes_the_same_prepacked_or_not(m):
    """Without prepack the layout is derived for the call: a model compressed in this process and
    the same model loaded (prepacked) give equal outputs, as the other formats do."""
    layer = nf4_layer(24, 128, bias=True)
    x = torch.randn(m, 128)
    with torch.no_grad():
        before = layer(x)
        assert torch.equal(layer.prepack(torch.float32)(x), before)


def test_calls_the_kernels_do_not_serve_run_bitsandbytes():
    """A gradient to record, kernel "reference", a layout the kernels cannot read, and no build:
    bitsandbytes' dequantization and F.linear, as before."""
    layer = nf4_layer(24, 128, bias=True).prepack(torch.float32)
    x = torch.randn(3, 128, requires_grad=True)
    ref = nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    y = layer(x)
    assert torch.equal(y, ref) and y.requires_grad
    layer.kernel = "reference"
    assert torch.equal(layer(x.detach()), ref.detach())
    straddling = nf4_layer(8, 96).prepack(torch.float32)
    assert straddling._fused is None


def test_a_failed_build_and_layer_copies(monkeypatch):
    layer = nf4_layer(16, 128).prepack(torch.float32)
    twin = copy.deepcopy(layer)  # its own tensors
    with torch.no_grad():
        twin.weight_packed.copy_(twin.weight_packed.roll(7, 0))  # changed in place: the checked layout is dropped
    x = torch.randn(1, 128)
    assert rel_err(layer(x), x.double() @ layer.dequantized_weight().double().T) < REL_TOL
    assert rel_err(twin(x), x.double() @ twin.dequantized_weight().double().T) < REL_TOL and twin._fused is None
    monkeypatch.setattr(cpu_fused, "library", lambda: None)  # a prepacked layer whose kernels are gone
    assert torch.equal(layer(x), nn.functional.linear(x, layer.dequantized_weight()))
    monkeypatch.setattr(cpu_fused, "available", lambda: False)
    assert layer.prepack(torch.float32)._fused is None
