"""The fused CPU matmul (cuda/cpu_fused.py) against the reference semantics, the choice of path
on CPU, and what happens where it cannot be compiled."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from compress.cuda import cpu_fused
from compress.cuda.layout import dequantize_sp24_words, dequantize_words, words_of
from compress.cuda.ops import int_linear
from compress.quant.packing import pack_codes
from compress.quant.quantize import compute_grid, quantize
from compress.quant.rtn import RTNConfig
from compress.sparsity.masks import nm_mask
from compress.sparsity.sparse_quant import SparseQuantLinear

# Relative error ||y - ref|| / ||ref||: fp32 measured <= 3.2e-7 (the same sums in another order);
# bf16 activations: the output's rounding to bf16, measured <= 1.9e-3
REL_TOL = {torch.float32: 1e-6, torch.bfloat16: 5e-3}


def weight(n: int, k: int, bits: int, group_size: int, symmetric: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // min(group_size, k))  # a shorter last group where the size does not divide K
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.1 + 0.01).half()
    zeros = None if symmetric else torch.randint(0, 2**bits, (groups, n), dtype=torch.uint8, generator=g)
    return words_of(pack_codes(codes, bits)), scales, zeros


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


# (bits, group size, symmetric): groups of 80 and 128 leave a shorter last group of 32 and 64 of K = 192
FORMATS = [(4, 64, True), (4, 16, False), (2, 32, False), (8, 1 << 30, True), (4, 80, False), (2, 128, True),
           (8, 128, False)]


@pytest.mark.parametrize("bits,group_size,symmetric", FORMATS)
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matmul_matches_the_reference(bits, group_size, symmetric, m, dtype):
    n, k = 40, 192  # N not a multiple of any vector width; 3 to 12 groups
    words, scales, zeros = weight(n, k, bits, group_size, symmetric)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = x.float() @ dequantize_words(words, scales, zeros, bits, group_size, k, torch.float32).T
    y = cpu_fused.matmul(x, words, scales, zeros, bits, group_size, k)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, ref) < REL_TOL[dtype]


def test_new_shapes_reuse_the_compilation():
    """Sizes are dynamic within a variant: other N, K and M run without compiling again."""
    words, scales, zeros = weight(24, 128, 4, 32, True)
    cpu_fused.matmul(torch.randn(3, 128), words, scales, zeros, 4, 32, 128)
    variants = dict(cpu_fused._compiled)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for n, k, m in ((56, 256, 2), (8, 64, 7)):
        words, scales, zeros = weight(n, k, 4, 32, True)
        x = torch.randn(m, k)
        y = cpu_fused.matmul(x, words, scales, zeros, 4, 32, k)
        assert rel_err(y, x @ dequantize_words(words, scales, zeros, 4, 32, k, torch.float32).T) < 1e-6
    assert cpu_fused._compiled == variants
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_auto_runs_it_for_few_rows_of_x_on_cpu(monkeypatch):
    torch.manual_seed(0)
    q = RTNConfig(bits=4, group_size=32).build().compress("l", nn.Linear(128, 48)).prepack()
    calls = []
    fused = cpu_fused.matmul
    monkeypatch.setattr(cpu_fused, "matmul", lambda *a: calls.append(a[0].shape[0]) or fused(*a))
    for m in (1, cpu_fused.MAX_M, cpu_fused.MAX_M + 1):
        x = torch.randn(1, m, 128)
        assert rel_err(q(x), x @ q.dequantized_weight().T + q.bias) < 1e-6
    assert calls == [1, cpu_fused.MAX_M]  # above MAX_M rows: the reference
    q.set_kernel("reference")(x)
    q.set_kernel("cpu_fused")(x)  # forced: any number of rows
    assert calls == [1, cpu_fused.MAX_M, cpu_fused.MAX_M + 1]


def test_formats_it_cannot_read_run_the_reference():
    torch.manual_seed(0)
    x = torch.randn(1, 202)
    q = RTNConfig(bits=2, group_size=64).build().compress("l", nn.Linear(202, 16)).prepack()  # a byte across groups
    assert not cpu_fused.applies(2, 64, 202) and cpu_fused.applies(2, 64, 200)
    assert not cpu_fused.applies(8, -1, 64) and not cpu_fused.sp24_applies(4, 0, 64)
    assert torch.equal(q(x), q.set_kernel("reference")(x))  # the reference ran
    q.set_kernel("auto")
    with pytest.raises(ValueError, match="kernel 'cpu_fused' takes CPU activations and 2, 4 or 8-bit words in "
                                         "groups of whole bytes, not cpu activations with 2-bit codes in groups "
                                         "of 64 \\(K = 202\\)"):
        q.set_kernel("cpu_fused")(x)
    # 3-bit codes are read as the 4-bit words they widen to
    q3 = RTNConfig(bits=3, group_size=64).build().compress("l", nn.Linear(256, 16)).prepack()
    x3 = torch.randn(1, 256)
    assert rel_err(q3.set_kernel("cpu_fused")(x3), x3 @ q3.dequantized_weight().T + q3.bias) < 1e-6


def test_a_compile_failure_turns_the_path_off_with_one_warning(monkeypatch):
    def fail(*args):
        raise torch._dynamo.exc.BackendCompilerFailed("inductor", RuntimeError("No working C++ compiler found"), None)

    class Broken(dict):  # every variant "compiled", each failing when called
        def __contains__(self, key):
            return True

        def __getitem__(self, key):
            return fail

    monkeypatch.setattr(cpu_fused, "_failure", None)  # both restored after the test
    monkeypatch.setattr(cpu_fused, "_compiled", Broken())
    torch.manual_seed(0)
    q = RTNConfig(bits=4, group_size=32).build().compress("l", nn.Linear(64, 16)).prepack()
    x = torch.randn(1, 64)
    with pytest.warns(RuntimeWarning, match="fused CPU matmul could not be compiled .*No working C.. compiler"):
        y = q(x)
    assert torch.equal(y, q.set_kernel("reference")(x))  # the reference ran
    assert not cpu_fused.available()
    with pytest.raises(ValueError, match="kernel 'cpu_fused' could not be compiled"):
        q.set_kernel("cpu_fused")(x)


def test_without_a_cxx_compiler_the_reference_runs(tmp_path):
    """A real failure, in a fresh process with an empty Inductor cache and no compiler to find."""
    script = textwrap.dedent("""
        import warnings, torch, torch._inductor.config as config
        config.cpp.cxx = ("/nonexistent/g++",)
        from compress.cuda import cpu_fused
        from compress.cuda.ops import int_linear
        words = torch.randint(-2**31, 2**31 - 1, (16, 8), dtype=torch.int32)
        scales = torch.rand(2, 16).half()
        x = torch.randn(1, 64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = int_linear(x, words, scales, None, 4, 32, 64)
        ref = int_linear(x, words, scales, None, 4, 32, 64, kernel="reference")
        ours = [str(w.message) for w in caught if str(w.message).startswith("compress:")]
        print(torch.equal(y, ref), cpu_fused.available(), len(ours), *ours)
    """)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("True False 1 compress: the fused CPU matmul could not be compiled "
                                 "(InvalidCxxCompiler: No working C++ compiler"), out.stdout


def test_it_runs_inside_a_compiled_model(monkeypatch):
    torch.manual_seed(0)
    q = RTNConfig(bits=4, group_size=32, symmetric=False).build().compress("l", nn.Linear(64, 16)).prepack()
    x = torch.randn(1, 64)
    calls = []
    fused = cpu_fused.matmul
    monkeypatch.setattr(cpu_fused, "matmul", lambda *a: calls.append(a[0].shape[0]) or fused(*a))
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x), q.set_kernel("reference")(x), atol=1e-5, rtol=1e-5)
    assert calls == [1]  # the op's implementation ran it, inside the compiled graph


def test_float64_activations_keep_the_reference():
    torch.manual_seed(0)
    q = RTNConfig(bits=4, group_size=32).build().compress("l", nn.Linear(64, 16)).prepack()
    x = torch.randn(1, 64, dtype=torch.float64)
    assert torch.equal(q(x), q.set_kernel("reference")(x))


def test_a_failure_at_run_time_falls_back_too(monkeypatch):
    """Not only compile errors: a recompile limit or an unsupported Python raise other types."""
    def fail(*args):
        raise torch._dynamo.exc.FailOnRecompileLimitHit("Hard failure due to fullgraph=True")

    monkeypatch.setattr(cpu_fused, "_failure", None)
    monkeypatch.setattr(cpu_fused, "_compiled", {})
    monkeypatch.setattr(cpu_fused.torch, "compile", lambda *a, **k: fail)
    words, scales, zeros = weight(16, 64, 4, 32, True)
    with pytest.warns(RuntimeWarning, match="FailOnRecompileLimitHit: Hard failure"):
        assert int_linear(torch.randn(1, 64), words, scales, zeros, 4, 32, 64) is not None
    assert not cpu_fused.available()


def test_the_op_serves_bf16_activations_without_a_packed_weight():
    """2-bit codes: PyTorch's packed CPU matmuls take none, the fused path does."""
    words, scales, zeros = weight(32, 128, 2, 64, False)
    x = torch.randn(1, 128).bfloat16()
    y = int_linear(x, words, scales, zeros, 2, 64, 128, kernel="cpu_fused")
    assert torch.equal(int_linear(x, words, scales, zeros, 2, 64, 128), y)
    assert rel_err(y, x.float() @ dequantize_words(words, scales, zeros, 2, 64, 128, torch.float32).T) < 5e-3


def sp24_weight(n: int, k: int, bits: int, group_size: int, symmetric: bool, seed: int = 0):
    """Kept codes and their slots (the first of a group of 4 in slot 0-2, the second after it) in
    the kernels' words, as cuda/layout.py describes them."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // min(group_size, k))  # a shorter last group where the size does not divide K
    kept = torch.randint(0, 2**bits, (n, k // 2), dtype=torch.uint8, generator=g)
    first = torch.randint(0, 3, (n, k // 4), generator=g)
    second = torch.maximum(torch.randint(0, 4, (n, k // 4), generator=g), first + 1)
    slots = torch.stack([first, second], dim=-1).reshape(n, k // 2).to(torch.uint8)
    scales = (torch.rand(groups, n, generator=g) * 0.1 + 0.01).half()
    zeros = None if symmetric else torch.randint(0, 2**bits, (groups, n), dtype=torch.uint8, generator=g)
    return words_of(pack_codes(kept, bits)), words_of(pack_codes(slots, 2)), scales, zeros


@pytest.mark.parametrize("bits,group_size,symmetric", FORMATS)
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_2_4_matmul_matches_the_reference(bits, group_size, symmetric, m, dtype):
    n, k = 40, 192
    words, positions, scales, zeros = sp24_weight(n, k, bits, group_size, symmetric)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = x.float() @ dequantize_sp24_words(words, positions, scales, zeros, bits, group_size, k, torch.float32).T
    y = cpu_fused.sp24_matmul(x, words, positions, scales, zeros, bits, group_size, k)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, ref) < REL_TOL[dtype]  # measured as for dense weights: 1.7e-7, 2.2e-3


def sparse_quant_layer(k: int, bits: int, group_size: int) -> SparseQuantLinear:
    torch.manual_seed(0)
    w = torch.randn(48, k)
    keep = nm_mask(w.abs(), 2, 4)
    grid = compute_grid(w * keep, bits, group_size, False)
    return SparseQuantLinear.from_codes(quantize(w, grid), keep, grid, "2:4", 0.5, torch.randn(48), "float16", "l")


def test_2_4_layers_run_it_for_few_rows_of_x_on_cpu(monkeypatch):
    layer = sparse_quant_layer(264, 4, 64).prepack()  # 4 groups and a last one of 8 columns
    calls = []
    fused = cpu_fused.sp24_matmul
    monkeypatch.setattr(cpu_fused, "sp24_matmul", lambda *a: calls.append(a[0].shape[0]) or fused(*a))
    for m in (1, cpu_fused.SP24_MAX_M, cpu_fused.SP24_MAX_M + 1):
        x = torch.randn(m, 264)
        assert rel_err(layer(x), x @ layer.dequantized_weight().T + layer.bias) < 1e-6
    assert calls == [1, cpu_fused.SP24_MAX_M]
    layer.set_kernel("cpu_fused")(x)
    assert calls == [1, cpu_fused.SP24_MAX_M, cpu_fused.SP24_MAX_M + 1]
    short = sparse_quant_layer(196, 4, 64)  # a last group of 4 columns, half a unit: the reference
    x = torch.randn(1, 196)
    assert rel_err(short(x), x @ short.dequantized_weight().T + short.bias) < 1e-6
    assert calls == [1, cpu_fused.SP24_MAX_M, cpu_fused.SP24_MAX_M + 1]
    with pytest.raises(ValueError, match="kernel 'cpu_fused' takes CPU activations and 2:4 weights of 2, 4 or "
                                         "8-bit codes in groups of whole 8-column units"):
        short.set_kernel("cpu_fused")(x)
