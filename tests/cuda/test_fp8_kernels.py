"""The Triton kernels for FP8 weights (cuda/triton_fp8.py) against the reference semantics
(FP8Linear.dequantized_weight, then a matmul).

Without a GPU they run in the interpreter (tests/conftest.py sets TRITON_INTERPRET) in fp32; on a
GPU the same tests run compiled, in fp16 and bf16. Shapes have tails in N and K and several K
tiles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.cuda import triton_fp8 as tf
from compress.cuda.fp8_ops import dequantize_fp8, fp8_linear, reference_weight
from compress.quant.layers import FP8Linear

from .test_cpu_fp8 import EVERY_CODE, fp8_weight, same_or_both_nan

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float32]
# ||y - ref|| / ||ref|| against the fp64 product: fp32 sums in another order (measured <= 2.2e-7
# in the interpreter); half precision: the reference rounds the weight and the output to 16 bits.
REL_TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def on_device(weight: torch.Tensor, scales: torch.Tensor):
    return weight.to(DEVICE), scales.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_code_dequantizes_exactly(dtype):
    """All 256 codes (subnormals, both zeros, 448, NaN) in tiles with N and K tails: the
    reference's weight bit for bit, in each dtype."""
    codes = torch.stack([EVERY_CODE.roll(r) for r in range(37)]).repeat(1, 2)[:, :300]
    weight, scales = on_device(codes.view(torch.float8_e4m3fn), torch.rand(37, 1) + 0.01)
    w = tf.dequantize(weight, scales, dtype)
    assert w.dtype == dtype and same_or_both_nan(w.cpu(), reference_weight(weight, scales, dtype).cpu())
    assert torch.equal(w.isnan().cpu(), codes & 0x7F == 0x7F)


@pytest.mark.skipif(CUDA, reason="the interpreter's stand-in for the GPU's conversion")
def test_the_conversion_path_scales_as_the_bits_path():
    """HW_FP8 (the GPU's e4m3 conversion, sm_89 on) in the interpreter, whose conversion matches
    the GPU's but for NaN codes (it gives 480): every other code's weight exactly, and the GEMV."""
    codes = torch.stack([EVERY_CODE.roll(r) for r in range(5)])
    codes = codes.masked_fill(codes & 0x7F == 0x7F, 0x7E)
    weight, scales = codes.view(torch.float8_e4m3fn), torch.rand(5, 1) + 0.01
    out = torch.empty(5, 256)
    tf._fp8_dequant_kernel[(1, 2)](codes, scales.reshape(-1), out, 5, 256, 256, BLOCK_N=32, BLOCK_K=128, HW_FP8=True)
    assert torch.equal(out, reference_weight(weight, scales, torch.float32))
    x = torch.randn(2, 256)
    y = torch.empty(2, 5)
    tf._fp8_gemv_kernel[(1, 2)](x, codes, scales.reshape(-1), y, 5, 256, 256, 256, 5, BLOCK_N=16, BLOCK_K=128,
                                HW_FP8=True)
    assert rel_err(y, x.double() @ reference_weight(weight, scales, torch.float64).T) < REL_TOL[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("n,k,block_k", [(50, 200, 256), (33, 600, 256), (8, 100, 512), (40, 1024, 256)])
def test_gemv_matches_the_reference(dtype, m, n, k, block_k):
    weight, scales = on_device(*fp8_weight(n, k, seed=n + k))
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    ref = x.double() @ reference_weight(weight, scales, torch.float64).T
    y = tf.gemv(x, weight, scales, block_n=16, block_k=block_k)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, ref) < REL_TOL[dtype]


def test_nan_codes_make_their_rows_nan():
    weight, scales = fp8_weight(20, 300)
    weight.view(torch.uint8)[3, 7], weight.view(torch.uint8)[17, 299] = 0x7F, 0xFF
    weight, scales = on_device(weight, scales)
    y = tf.gemv(torch.randn(2, 300, device=DEVICE).to(DTYPES[0]), weight, scales)
    nan_rows = y.isnan().all(0).cpu()
    assert nan_rows.nonzero().flatten().tolist() == [3, 17] and not bool(y.isnan().cpu()[:, ~nan_rows].any())
    ref = torch.randn(4, 20)
    assert tf._agrees(ref.masked_fill(nan_rows, float("nan")), ref.masked_fill(nan_rows, float("nan")))
    assert not tf._agrees(ref.masked_fill(nan_rows, float("nan")), ref)


def test_the_tuner_accepts_a_gemv_that_differs_by_rounding_the_weight():
    """In bf16 the GEMV's exact weight and the reference's rounded one differ by ~3e-3 (relative):
    a usable candidate; a wrong one is off by ~1."""
    ref = torch.randn(16, 256)
    off = (ref * (1 + 4e-3 * torch.randn(16, 256))).to(torch.bfloat16)
    assert tf._agrees(off, ref.to(torch.bfloat16)) and not tf._agrees(ref.flip(1).to(torch.bfloat16),
                                                                      ref.to(torch.bfloat16))
    assert not tf._agrees(off.float(), ref) and tf._agrees(ref * (1 + 1e-5), ref)  # fp32: 1e-3
    assert not tf._agrees(ref[:8], ref)


@pytest.mark.parametrize("m", [1, 5, tf.GEMV_MAX_M + 1])
def test_the_op_runs_our_kernels(m):
    """kernel "triton" (or "auto" on CUDA): a GEMV up to GEMV_MAX_M rows of x (the interpreter
    takes the first candidate), beyond that our dequantization and PyTorch's matmul."""
    weight, scales = on_device(*fp8_weight(48, 160, seed=m))
    dtype = DTYPES[-1]
    x = torch.randn(2, m, 160, device=DEVICE).to(dtype)
    kernel = "auto" if CUDA else "triton"
    y = fp8_linear(x, weight, scales, kernel)
    ref = nn.functional.linear(x.double(), reference_weight(weight, scales, torch.float64))
    assert y.shape == (2, m, 48) and rel_err(y, ref) < REL_TOL[dtype]
    assert [c.name for c in tf.candidates(m)][-1] == "dequant+matmul"
    assert (tf.candidates(m)[0].name.startswith("fp8 gemv")) == (m <= tf.GEMV_MAX_M)
    w = dequantize_fp8(weight, scales, dtype, kernel)
    assert torch.equal(w, reference_weight(weight, scales, dtype))


@pytest.mark.skipif(CUDA, reason="the refusal is for machines without a GPU")
def test_triton_without_a_gpu_or_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    weight, scales = fp8_weight(8, 64)
    with pytest.raises(ValueError, match="kernel 'triton' needs a CUDA device"):
        fp8_linear(torch.randn(1, 64), weight, scales, "triton")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 256])
def test_large_layer_on_gpu(dtype, m):
    """The chosen path is right, and no candidate was ruled out for disagreeing with the reference."""
    weight, scales = on_device(*fp8_weight(4096, 4096))
    x = torch.randn(m, 4096, device="cuda").to(dtype)
    ref = x.double() @ reference_weight(weight, scales, torch.float64).T
    assert rel_err(tf.fp8_matmul(x, weight, scales), ref) < REL_TOL[dtype]
    assert not any(tf.TUNER.rejected.values()), tf.TUNER.rejected


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_fp8_layer_under_inductor_and_cuda_graphs():
    torch.manual_seed(0)
    layer = FP8Linear.from_weight(torch.randn(512, 1024), torch.randn(512), "float32").cuda().prepack(torch.bfloat16)
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    eager = layer(x)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        y = compiled(x)
    assert rel_err(y, eager) < 1e-3
