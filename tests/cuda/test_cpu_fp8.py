"""FP8 (e4m3) weights on CPU: the C++ kernels (cuda/cpu_fp8.py) against the reference semantics
(FP8Linear.dequantized_weight, then a matmul), the ops of cuda/fp8_ops.py, and FP8Linear's use
of them."""

from __future__ import annotations

import copy
import platform

import pytest
import torch
from torch import nn

from compress.cuda import cpu_fp8, cpu_fused, fp8_ops
from compress.cuda.fp8_ops import dequantize_fp8, fp8_linear, reference_weight
from compress.quant.layers import FP8Linear

from .test_cpu_fused import _compiler_found, build_for

pytestmark = pytest.mark.skipif(not _compiler_found(), reason="no C++ compiler: the CPU kernels cannot be built")

# Relative error ||y - ref|| / ||ref|| in fp32: the same products (exact: a code's value times
# 2**-8, the scale times 2**8) summed in another order, measured <= 2.1e-7 over the shapes below;
# bf16 activations: the output's rounding to bf16 (the reference rounds the weight too), <= 2.6e-3.
REL_TOL = {torch.float32: 1e-6, torch.bfloat16: 6e-3, torch.float16: 1e-3}
EVERY_CODE = torch.arange(256, dtype=torch.uint8)  # NaN: 0x7f and 0xff; subnormal: exponent bits 0


def fp8_weight(n: int, k: int, seed: int = 0, scale_dtype: torch.dtype = torch.float32):
    """An FP8Linear-like weight: e4m3 values spread over the whole range (subnormals to 448),
    scales [n, 1]."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, k, generator=g) * torch.logspace(-3, 2.5, k)[torch.randperm(k, generator=g)]
    scales = (torch.rand(n, 1, generator=g) * 0.02 + 0.001).to(scale_dtype)
    return values.clamp(-448, 448).to(torch.float8_e4m3fn), scales


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def same_or_both_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def test_every_code_dequantizes_exactly():
    """All 256 codes (subnormals, both zeros, 448, NaN), in vectors and in a row's tail, each scale
    dtype: the reference's fp32 weight bit for bit, then the dtype as the reference rounds it."""
    codes = torch.stack([EVERY_CODE.roll(r) for r in range(3)]).repeat(1, 2)[:, :509]  # K = 509: a tail
    weight = codes.view(torch.float8_e4m3fn)
    for scale_dtype in (torch.float32, torch.float16, torch.bfloat16):
        scales = torch.tensor([[1.0], [0.37], [3.0e-3]]).to(scale_dtype)
        for dtype in (torch.float32, torch.bfloat16):
            w = cpu_fp8.dequantize(weight, scales, dtype)
            ref = reference_weight(weight, scales, dtype)
            assert w.dtype == dtype and same_or_both_nan(w, ref), (scale_dtype, dtype)
            assert torch.equal(w.isnan(), codes & 0x7F == 0x7F)  # 0x7f and 0xff


@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 9, 16, 17])
@pytest.mark.parametrize("n,k", [(37, 100), (64, 576), (5, 16), (9, 7), (24, 1040)])
def test_fused_matmul_matches_the_reference(m, n, k):
    """Rows of x 1 to 17 (up to 8 share each decoded row, then the next block), K with tails
    shorter than a vector and vectors beyond the unrolled loop."""
    weight, scales = fp8_weight(n, k, seed=m + n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    ref = x.double() @ reference_weight(weight, scales, torch.float64).T
    y = cpu_fp8.matmul(x, weight, scales)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert rel_err(y, ref) < REL_TOL[torch.float32]


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_and_activation_dtypes(scale_dtype, dtype):
    weight, scales = fp8_weight(48, 576, scale_dtype=scale_dtype)
    x = torch.randn(2, 3, 576).to(dtype)
    ref = nn.functional.linear(x.double(), reference_weight(weight, scales, torch.float64))
    for m in (x, x.reshape(-1, 576)[:1]):  # [..., K] kept as x comes
        y = cpu_fp8.matmul(m, weight, scales)
        assert y.dtype == dtype and y.shape == (*m.shape[:-1], 48)
    assert rel_err(cpu_fp8.matmul(x, weight, scales), ref) < REL_TOL[dtype]


def test_nan_codes_make_their_rows_nan():
    """A NaN code anywhere in a row (a vector's lane or the tail) makes that row's outputs NaN, as
    the reference's NaN weight does, and leaves the other rows alone; at 1 and 2 rows of x (codes
    decoded 32 at a time) and 3 (16 at a time)."""
    weight, scales = fp8_weight(4, 300)
    codes = weight.view(torch.uint8)
    codes[1, 17], codes[2, 299] = 0x7F, 0xFF
    for m in (1, 2, 3):
        x = torch.randn(m, 300)
        y, ref = cpu_fp8.matmul(x, weight, scales), x @ reference_weight(weight, scales, torch.float32).T
        assert torch.equal(y.isnan(), ref.isnan()) and bool(y[:, 1:3].isnan().all()), m
        assert rel_err(y[:, [0, 3]], ref[:, [0, 3]]) < REL_TOL[torch.float32]
    assert same_or_both_nan(cpu_fp8.dequantize(weight, scales, torch.float32),
                            reference_weight(weight, scales, torch.float32))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 instruction set levels")
@pytest.mark.parametrize("march,needs", [("x86-64", "sse2"), ("x86-64-v3", "avx2")])
def test_other_instruction_sets_compute_the_same(march, needs, monkeypatch):
    """The kernels as CPUs without AVX-512 run them, built here with -march=...: AVX2 + F16C decode
    8 codes a vector by the same conversion, SSE2 4 by the bits' formula (NaN lanes NaN)."""
    build_for(march, needs, monkeypatch)
    codes = torch.stack([EVERY_CODE.roll(r) for r in range(3)])[:, :253]
    weight, scales = codes.view(torch.float8_e4m3fn), torch.tensor([[1.0], [0.5], [2.0]])
    assert same_or_both_nan(cpu_fp8.dequantize(weight, scales, torch.float32),
                            reference_weight(weight, scales, torch.float32))
    for m, k in ((1, 576), (3, 100), (9, 1040)):
        weight, scales = fp8_weight(24, k, seed=k)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        ref = x.double() @ reference_weight(weight, scales, torch.float64).T
        assert rel_err(cpu_fp8.matmul(x, weight, scales), ref) < REL_TOL[torch.float32], (march, m, k)
    weight, scales = fp8_weight(3, 253)
    weight.view(torch.uint8)[0, 250] = 0x7F
    y = cpu_fp8.matmul(torch.randn(2, 253), weight, scales)
    assert bool(y[:, 0].isnan().all()) and not bool(y[:, 1:].isnan().any())


def test_weights_and_scales_that_do_not_match_are_refused():
    weight, scales = fp8_weight(8, 64)
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match=r"fp8 weight \[N, K\].*\(8, 64\).*7 scales"):
        cpu_fp8.matmul(x, weight, scales[:7])
    with pytest.raises(ValueError, match=r"torch.float32"):
        cpu_fp8.FusedFp8(weight.float(), scales)
    with pytest.raises(ValueError, match="rows contiguous"):
        cpu_fp8.dequantize(weight.T, scales, torch.float32)
    with pytest.raises(ValueError, match=r"activations \[\.\.\., 64\]"):
        cpu_fp8.matmul(torch.randn(1, 63), weight, scales)


@pytest.mark.parametrize("m", [1, cpu_fp8.MAX_M, cpu_fp8.MAX_M + 1, 130])
def test_the_op_runs_the_fused_matmul_up_to_max_m_then_the_dequantization(m, monkeypatch):
    """"auto" on CPU: the fused matmul for up to MAX_M rows of x, beyond that the C++ weight in
    blocks of rows (blocks of 16 rows here: several) and PyTorch's matmul; "reference" neither.
    Each path gives the reference's values."""
    monkeypatch.setattr("compress.cuda.cpu_dequantize.BLOCK_FLOATS", 16 * 96)
    weight, scales = fp8_weight(40, 96, seed=m)
    x = torch.randn(m, 96)
    calls = []
    for name in ("matmul", "dequantize"):
        real = getattr(cpu_fp8, name)
        monkeypatch.setattr(cpu_fp8, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    ref = x @ reference_weight(weight, scales, torch.float32).T
    assert rel_err(fp8_linear(x, weight, scales), ref) < REL_TOL[torch.float32]
    assert calls == (["matmul"] if m <= cpu_fp8.MAX_M else ["dequantize"] * 3)
    calls.clear()
    assert torch.equal(fp8_linear(x, weight, scales, "reference"), nn.functional.linear(
        x, reference_weight(weight, scales, torch.float32)))
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_activations_take_the_weight_rounded_as_the_reference_rounds_it(dtype):
    """The reference rounds the weight to x's dtype: the op gives 16-bit x the C++ weight so rounded
    (the fused matmul would skip it) at every M, the reference's output exactly."""
    weight, scales = fp8_weight(40, 96)
    for m in (1, 20):
        x = torch.randn(m, 96).to(dtype)
        assert torch.equal(fp8_linear(x, weight, scales), fp8_linear(x, weight, scales, "reference")), m


def test_the_ops_trace_compile_and_pass_gradients():
    weight, scales = fp8_weight(32, 64)
    x = torch.randn(2, 64, dtype=torch.float64)
    # opcheck's schema test multiplies every tensor argument, which PyTorch does not do for fp8
    checks = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(fp8_ops.fp8_linear_op, (x.float(), weight, scales, "auto"), test_utils=checks)
    torch.library.opcheck(fp8_ops.fp8_linear_no_grad, (x.float(), weight, scales, "auto"), test_utils=checks)
    torch.library.opcheck(dequantize_fp8, (weight, scales, torch.bfloat16, "auto"), test_utils=checks)
    # x's gradient through the dense weight; trained scales through the reference
    xg, sg = x.float().requires_grad_(), scales.clone().requires_grad_()
    fp8_linear(xg, weight, sg).square().sum().backward()
    xr, sr = x.float().requires_grad_(), scales.clone().requires_grad_()
    nn.functional.linear(xr, reference_weight(weight, sr, torch.float32)).square().sum().backward()
    assert rel_err(xg.grad, xr.grad) < 1e-5 and rel_err(sg.grad, sr.grad) < 1e-5
    compiled = torch.compile(lambda t: fp8_linear(t, weight, scales), fullgraph=True, backend="eager")
    with torch.no_grad():
        assert rel_err(compiled(x.float()), x.float() @ reference_weight(weight, scales, torch.float32).T) < 1e-6


def test_unknown_kernels_are_refused():
    weight, scales = fp8_weight(8, 64)
    with pytest.raises(ValueError, match="fp8 weights run kernel 'auto', 'reference', 'triton', 'cpu_fused', not "
                                         "'tinygemm'"):
        fp8_linear(torch.randn(1, 64), weight, scales, "tinygemm")
    with pytest.raises(ValueError, match="unknown kernel 'cpu_packed'"):
        FP8Linear.from_weight(torch.randn(8, 64), None, "float32").set_kernel("cpu_packed")


def test_the_ops_refuse_what_they_cannot_take_in_one_line():
    weight, scales = fp8_weight(8, 64)
    cases = [((torch.randn(1, 64), weight.float(), scales), r"float8_e4m3fn weight \[N, K\], not torch.float32"),
             ((torch.randn(1, 64), weight.view(torch.float8_e5m2), scales), "not torch.float8_e5m2"),
             ((torch.randn(1, 64), weight, scales[:1]), r"one scale per row of the \(8, 64\) weight.*not 1 scales"),
             ((torch.randn(3, 2, 32), weight, scales), r"activations \[\.\.\., 64\] on cpu, not \(3, 2, 32\)")]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            fp8_linear(*args)
    with pytest.raises(ValueError, match="not 7 scales"):
        dequantize_fp8(weight, scales[:7], torch.float32, "auto")


def test_weights_the_kernels_cannot_read_run_the_reference():
    """A transposed (column-major) weight view and strided scales: the reference's values, no error."""
    weight, scales = fp8_weight(64, 48)
    weight_t = weight.T  # [48, 64], rows not contiguous
    wide = torch.cat([scales, scales], 1)[:48, :1]  # [48, 1] with a row stride of 2
    x = torch.randn(2, 64)
    ref = nn.functional.linear(x, reference_weight(weight_t, wide, torch.float32))
    assert torch.equal(fp8_linear(x, weight_t, wide), ref)
    assert torch.equal(dequantize_fp8(weight_t, wide, torch.float32, "auto"), reference_weight(weight_t, wide,
                                                                                               torch.float32))
    contiguous = weight_t.contiguous()  # the kernels' path, with the strided scales made contiguous
    assert rel_err(fp8_linear(x, contiguous, wide), ref) < REL_TOL[torch.float32]


def test_a_layer_pickled_before_layers_had_a_kernel_still_runs():
    layer = fp8_layer()
    state = layer.__getstate__()
    del state["kernel"]
    restored = FP8Linear.__new__(FP8Linear)
    restored.__setstate__(state)
    x = torch.randn(1, 96)
    assert restored.kernel == "auto" and torch.equal(restored(x), layer(x))


def fp8_layer(n: int = 48, k: int = 96, bias: bool = True) -> FP8Linear:
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=bias)
    return FP8Linear.from_weight(linear.weight, linear.bias, "float16")


def test_fp8_linear_prepacks_the_fused_matmul_and_calls_it_directly(monkeypatch):
    layer = fp8_layer()
    x = torch.randn(3, 96)
    ref = nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    before = layer(x)  # not prepacked: through the op
    assert layer._fused is None and rel_err(before, ref) < REL_TOL[torch.float32]
    layer.prepack(torch.float32)
    assert isinstance(layer._fused, cpu_fp8.FusedFp8)
    monkeypatch.setattr(fp8_ops, "_fp8_linear", lambda *a: pytest.fail("the op ran"))
    assert torch.equal(layer(x), before)
    with torch.no_grad():
        layer.scales.mul_(2)  # a buffer changed in place: the checked weight is dropped
    monkeypatch.undo()
    assert rel_err(layer(x) - layer.bias, 2 * (before - layer.bias)) < 1e-6 and layer._fused is None
    # a deep copy reads its own tensors; "reference" skips the kernels
    layer.prepack(torch.float32)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.weight_fp8.zero_()
    twin.prepack(torch.float32)
    assert torch.equal(twin(x), twin.bias.expand(3, -1)) and not torch.equal(layer(x), twin(x))
    layer.set_kernel("reference")
    assert torch.equal(layer(x), nn.functional.linear(x, layer.dequantized_weight(), layer.bias))


def test_fp8_linear_without_the_kernels_runs_the_reference(monkeypatch):
    monkeypatch.setattr(cpu_fused, "available", lambda: False)
    layer = fp8_layer(bias=False).prepack(torch.float32)
    assert layer._fused is None
    x = torch.randn(2, 96)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.dequantized_weight()))
