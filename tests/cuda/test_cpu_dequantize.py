"""The C++ dequantization on CPU (cuda/cpu_dequantize.py) against the reference: the same weight
bit for bit; and what "auto" runs it for (more rows of x than the fused matmuls serve, the
gradient of x, compress::dequantize_int), blocks of rows included."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from compress.cuda import cpu_dequantize, cpu_fused, cpu_native, cpu_packed
from compress.cuda.layout import dense_sp24_values, dequantize_sp24_words, dequantize_words
from compress.cuda.ops import dequantize_int, int_linear, sp24_int_linear, sp24_linear
from compress.quant.rtn import RTNConfig
from tests.cuda.test_cpu_fused import (_compiler_found, rel_err, sp24_values, sp24_weight, sparse_layer,
                                       sparse_quant_layer, weight)

pytestmark = pytest.mark.skipif(not _compiler_found(), reason="no C++ compiler: the CPU kernels cannot be built")

def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (torch.equal takes -0.0 for +0.0)."""
    as_int = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(as_int), b.view(as_int))


# (bits, group size, symmetric): 80 and 128 leave a shorter last group of K = 192; 1 << 30 per channel;
# groups of 8 are narrower than an output vector's words at 4 and 8 bits (a code at a time)
FORMATS = [(4, 64, True), (4, 16, False), (2, 32, False), (8, 1 << 30, True), (4, 80, False), (2, 128, True),
           (8, 128, False), (4, 8, True), (8, 8, False), (8, 16, True)]


@pytest.mark.parametrize("bits,group_size,symmetric", FORMATS)
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [192, 608])  # rows of 6 to 152 words: none, one or many 16-word chunks, and a rest
def test_dequantize_is_the_reference_exactly(bits, group_size, symmetric, scale_dtype, k):
    words, scales, zeros = weight(40, k, bits, group_size, symmetric)
    scales = scales.to(scale_dtype)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = cpu_dequantize.dequantize(words, scales, zeros, bits, group_size, k, dtype)
        assert w.dtype == dtype and same_bits(w, dequantize_words(words, scales, zeros, bits, group_size, k, dtype))


FP16_SPECIALS = """
    import torch
    from compress.cuda import cpu_dequantize
    from compress.cuda.layout import dequantize_words
    from tests.cuda.test_cpu_fused import weight
    words, scales, zeros = weight(16, 64, 4, 32, False)
    # subnormal, zero, -0, the largest half, infinity, normal values
    scales = torch.tensor([[2**-20, 0.0, -0.0, 65504.0, float("inf"), 0.1, -3.5, 2**-14] * 2] * 2).half()
    w = cpu_dequantize.dequantize(words, scales, zeros, 4, 32, 64, torch.float32)
    ref = dequantize_words(words, scales, zeros, 4, 32, 64, torch.float32)
    print(torch.equal(w.view(torch.int32), ref.view(torch.int32)))
"""


@pytest.mark.parametrize("cxx_flags", ["", pytest.param("-mno-f16c", marks=pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"), reason="-mno-f16c is an x86 flag"))])
def test_fp16_scales_convert_exactly_with_or_without_f16c(cxx_flags, tmp_path):
    """Half scales convert by one instruction where the CPU has F16C (x86), else by their bits (the
    build for a CPU without it, made here with -mno-f16c): both give the reference's weight bit for
    bit, subnormal, signed zero and infinite scales included (NaN products where they meet zero
    codes: compared as bits)."""
    cxx = " ".join(shlex.quote(part) for part in cpu_native._compiler())
    env = {**os.environ, "COMPRESS_CACHE": str(tmp_path), "CXX": f"{cxx} {cxx_flags}".strip()}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(FP16_SPECIALS)], capture_output=True, text=True,
                         env=env, timeout=300, cwd=Path(__file__).parents[2])
    assert out.returncode == 0 and out.stdout.split() == ["True"], (out.stdout, out.stderr[-2000:])


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 64, True), (2, 128, False), (8, 1 << 30, False),
                                                       (4, 80, False)])
def test_2_4_dequantize_is_the_reference_exactly(bits, group_size, symmetric):
    k = 320 if group_size == 80 else 256  # 80: four groups of 80 columns, 40 kept codes each
    words, positions, scales, zeros = sp24_weight(33, k, bits, group_size, symmetric)
    for dtype in (torch.float32, torch.bfloat16):
        w = cpu_dequantize.sp24_dequantize(words, positions, scales, zeros, bits, group_size, k, dtype)
        ref = dequantize_sp24_words(words, positions, scales, zeros, bits, group_size, k, dtype)
        assert same_bits(w, ref) and (w != 0).sum() <= 33 * k // 2  # zero outside the kept slots


@pytest.mark.parametrize("values_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_2_4_values_are_placed_as_the_reference_places_them(values_dtype):
    values, positions = sp24_values(17, 200, values_dtype)
    for dtype in (torch.float32, torch.bfloat16):
        w = cpu_dequantize.sp24_float_dense(values, positions, 200, dtype)
        assert same_bits(w, dense_sp24_values(values, positions, 200, dtype))


def wider(t: torch.Tensor) -> torch.Tensor:
    """The same rows, 2 x as far apart (a view of a wider tensor)."""
    return torch.cat([t, t], dim=1)[:, :t.shape[1]]


def test_strided_rows_and_refused_inputs():
    words, scales, zeros = weight(16, 128, 4, 32, False)
    assert same_bits(cpu_dequantize.dequantize(wider(words), scales, zeros, 4, 32, 128, torch.float32),
                     dequantize_words(words, scales, zeros, 4, 32, 128, torch.float32))
    sp_words, positions, sp_scales, sp_zeros = sp24_weight(16, 256, 4, 64, False)
    assert same_bits(cpu_dequantize.sp24_dequantize(wider(sp_words), wider(positions), sp_scales, sp_zeros, 4, 64,
                                                    256, torch.float32),
                     dequantize_sp24_words(sp_words, positions, sp_scales, sp_zeros, 4, 64, 256, torch.float32))
    values, value_positions = sp24_values(16, 256, torch.bfloat16)
    assert same_bits(cpu_dequantize.sp24_float_dense(wider(values), wider(value_positions), 256, torch.float32),
                     dense_sp24_values(values, value_positions, 256, torch.float32))
    with pytest.raises(ValueError, match="do not read 4-bit codes in groups of 4 \\(K = 128\\)"):
        cpu_dequantize.dequantize(words, scales, zeros, 4, 4, 128, torch.float32)
    with pytest.raises(ValueError, match="expected 4 x 16 scales"):
        cpu_dequantize.dequantize(words, scales[:3], zeros, 4, 32, 128, torch.float32)
    sp_words, positions, sp_scales, _ = sp24_weight(16, 128, 4, 64, True)
    with pytest.raises(ValueError, match="positions \\(8, 4\\) \\(torch.int32\\) for 16 rows of 64 kept values"):
        cpu_dequantize.sp24_dequantize(sp_words, positions[:8], sp_scales, None, 4, 64, 128, torch.float32)
    values, positions = sp24_values(16, 64, torch.float64)
    with pytest.raises(ValueError, match="got 2:4 values \\(16, 32\\) \\(torch.float64\\) for K = 64"):
        cpu_dequantize.sp24_float_dense(values, positions, 64, torch.float32)


def test_blocks_of_rows_give_the_whole_product(monkeypatch):
    """Weights larger than a block run block by block (the last one shorter) to the same result."""
    n, k = 200, 256
    words, scales, zeros = weight(n, k, 4, 64, False)
    sp_words, positions, sp_scales, sp_zeros = sp24_weight(n, k, 4, 64, False)
    values, value_positions = sp24_values(n, k, torch.float32)
    x = torch.randn(20, k, generator=torch.Generator().manual_seed(1))
    refs = (x @ dequantize_words(words, scales, zeros, 4, 64, k, torch.float32).T,
            x @ dequantize_sp24_words(sp_words, positions, sp_scales, sp_zeros, 4, 64, k, torch.float32).T,
            x @ dense_sp24_values(values, value_positions, k, torch.float32).T)
    blocks = []
    place = cpu_dequantize.dequantize
    monkeypatch.setattr(cpu_dequantize, "dequantize", lambda w, *a: blocks.append(w.shape[0]) or place(w, *a))
    monkeypatch.setattr(cpu_dequantize, "BLOCK_FLOATS", 48 * k)  # blocks of 48 rows: 4 and one of 8
    ys = (cpu_dequantize.int_linear(x, words, scales, zeros, 4, 64, k),
          cpu_dequantize.sp24_int_linear(x, sp_words, positions, sp_scales, sp_zeros, 4, 64, k),
          cpu_dequantize.sp24_float_linear(x, values, value_positions, k))
    assert blocks == [48, 48, 48, 48, 8]
    for y, ref in zip(ys, refs):
        assert y.shape == (20, n) and rel_err(y, ref) < 1e-6  # the same sums, another matmul blocking


def test_auto_dequantizes_in_cpp_above_the_fused_rows(monkeypatch):
    torch.manual_seed(0)
    q = RTNConfig(bits=4, group_size=32).build().compress("l", nn.Linear(128, 48)).prepack()
    layer = sparse_quant_layer(256, 4, 64).prepack()
    values = sparse_layer(48, 200)
    calls = []
    for name in ("int_linear", "sp24_int_linear", "sp24_float_linear"):
        run = getattr(cpu_dequantize, name)
        monkeypatch.setattr(cpu_dequantize, name, lambda *a, run=run: calls.append(a[0].shape[0]) or run(*a))
    for module, most in ((q, cpu_fused.MAX_M), (layer, cpu_fused.sp24_max_m(64)), (values, cpu_fused.sp24_max_m())):
        calls.clear()
        for m in (most, most + 1, 3 * most):
            x = torch.randn(m, module.in_features)
            y = module(x)
            assert rel_err(y, module.set_kernel("reference")(x)) < 1e-6  # measured 0: the same weight
            module.set_kernel("auto")
        assert calls == [most + 1, 3 * most]  # not the rows the fused matmul serves, nor the forced reference
        module.set_kernel("cpu_fused")(torch.randn(3 * most, module.in_features))
        assert calls == [most + 1, 3 * most]  # forced: the fused matmul at any number of rows


def test_the_gradient_and_dequantize_int_use_it_with_the_reference_result(monkeypatch):
    words, scales, zeros = weight(48, 192, 4, 64, False)
    sp_words, positions, sp_scales, sp_zeros = sp24_weight(48, 192, 4, 64, False)
    values, value_positions = sp24_values(48, 192, torch.float32)
    used = []
    for name in ("dequantize", "sp24_dequantize", "sp24_float_dense"):
        run = getattr(cpu_dequantize, name)
        monkeypatch.setattr(cpu_dequantize, name, lambda *a, run=run, name=name: used.append(name) or run(*a))
    x = torch.randn(3, 192, requires_grad=True)
    grad = torch.randn(3, 48)
    for op, args in ((int_linear, (words, scales, zeros, 4, 64, 192)),
                     (sp24_int_linear, (sp_words, positions, sp_scales, sp_zeros, 4, 64, 192)),
                     (sp24_linear, (values, value_positions))):
        (gx,) = torch.autograd.grad(op(x, *args), x, grad)
        (ref,) = torch.autograd.grad(op(x, *args, kernel="reference"), x, grad)
        assert torch.equal(gx, ref)  # the same weight, the same matmul
    assert used == ["dequantize", "sp24_dequantize", "sp24_float_dense"]
    w = dequantize_int(words, scales, zeros, 4, 64, 192, torch.bfloat16, "auto")
    assert used[-1] == "dequantize" and len(used) == 4
    assert same_bits(w, dequantize_int(words, scales, zeros, 4, 64, 192, torch.bfloat16, "reference"))


def test_a_build_failure_runs_the_reference_for_many_rows(monkeypatch):
    monkeypatch.setattr(cpu_native, "_library", None)
    monkeypatch.setattr(cpu_native, "_failure", None)
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    words, scales, zeros = weight(48, 192, 4, 64, False)
    x = torch.randn(cpu_fused.MAX_M + 1, 192)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ CPU kernels could not be built"):
        y = int_linear(x, words, scales, zeros, 4, 64, 192)
    assert torch.equal(y, int_linear(x, words, scales, zeros, 4, 64, 192, kernel="reference"))
    assert torch.equal(dequantize_int(words, scales, zeros, 4, 64, 192, torch.float32, "auto"),
                       dequantize_words(words, scales, zeros, 4, 64, 192, torch.float32))


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, -1), (3, 64)])  # int4 and int8 packed; 3-bit widened
def test_bf16_packed_weights_serve_up_to_their_rows_then_the_dequantization(bits, group_size, monkeypatch):
    torch.manual_seed(0)
    q = RTNConfig(bits=bits, group_size=group_size).build().compress("l", nn.Linear(256, 48))
    q.prepack(torch.bfloat16)
    assert q._cpu_packed is not None
    calls = []
    run = cpu_dequantize.int_linear
    monkeypatch.setattr(cpu_dequantize, "int_linear", lambda *a: calls.append(a[0].shape[0]) or run(*a))
    most = cpu_packed.MAX_M
    for m in (most, most + 1):
        x = torch.randn(1, m, 256, dtype=torch.bfloat16)
        y = q.set_kernel("auto")(x)
        ref = x.float() @ q.dequantized_weight().T + q.bias
        assert y.dtype == torch.bfloat16 and rel_err(y, ref) < 1e-2  # measured <= 3.3e-3: bf16 roundings
        if m == most or bits == 3:  # a widened layer holds the packed weight only: it serves every M
            assert torch.equal(y, q.set_kernel("cpu_packed")(x))
        else:  # the dequantization: the reference's weight, one block, the same matmul
            assert torch.equal(y, q.set_kernel("reference")(x))
    assert calls == ([] if bits == 3 else [most + 1])


def test_a_build_failure_keeps_packed_weights_on_their_matmul_at_every_row_count(monkeypatch):
    monkeypatch.setattr(cpu_native, "_library", None)
    monkeypatch.setattr(cpu_native, "_failure", None)
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    torch.manual_seed(0)
    q = RTNConfig(bits=4, group_size=64).build().compress("l", nn.Linear(256, 48)).prepack(torch.bfloat16)
    x = torch.randn(cpu_packed.MAX_M + 1, 256, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ CPU kernels could not be built"):
        y = q(x)  # the first call learns of the failure: the reference
    assert torch.equal(y, q.set_kernel("reference")(x))
    assert torch.equal(q.set_kernel("auto")(x), q.set_kernel("cpu_packed")(x))  # then the packed matmul
