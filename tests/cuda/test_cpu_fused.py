"""The fused CPU matmuls (cuda/cpu_fused.py: C++ kernels for dense and 2:4 codes) against the
reference semantics, the choice of path on CPU, and what happens where they cannot be built."""

from __future__ import annotations

import copy
import gc
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from compress.cuda import cpu_dequantize, cpu_fused, cpu_native
from compress.cuda.layout import dense_sp24_values, dequantize_sp24_words, dequantize_words, words_of
from compress.cuda.ops import int_linear, sp24_linear
from compress.quant.packing import pack_codes
from compress.quant.quantize import compute_grid, quantize
from compress.quant.rtn import RTNConfig
from compress.sparsity.masks import nm_mask
from compress.sparsity.layers import SparseLinear
from compress.sparsity.sparse_quant import SparseQuantLinear

def _compiler_found() -> bool:
    try:
        return bool(cpu_native._compiler())
    except RuntimeError:
        return False


pytestmark = pytest.mark.skipif(not _compiler_found(), reason="no C++ compiler: the fused CPU kernels cannot be built")

# Relative error ||y - ref|| / ||ref||. fp32: the same sums in another order, measured <= 3.8e-7
# at 4 and 8 bits, K = 192 to 1152 (<= 1.8e-7 against the fp64 product, and <= 1.7e-7 at K = 4096
# and 11008, where PyTorch's fp32 matmul of the dequantized weight is <= 5.1e-7); 2-bit codes and
# one row of x, each word's scale and bias factored out of its codes' sum (csrc/cpu_int_matmul.cpp:
# add_words), <= 9.1e-7. bf16 activations: the output's rounding to bf16, measured <= 1.9e-3.
REL_TOL = {torch.float32: 2e-6, torch.bfloat16: 5e-3}


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


@pytest.mark.parametrize("group_size,symmetric", [(128, False), (128, True), (256, True), (1 << 30, False)])
@pytest.mark.parametrize("m", [1, 3, 9])
@pytest.mark.parametrize("k", [512, 576, 608])
def test_4_bit_groups_of_a_vector_or_more_match_the_reference(group_size, symmetric, m, k):
    """4-bit codes whose 16-word vectors lie in one group (groups of 128 columns, 16 words, through
    the spanning path; 256 and per-channel a group at a time) take the group's 16 weights as a
    table with AVX-512: whole groups, shorter last ones (K = 576, 608) and masked last vectors."""
    n = 24
    words, scales, zeros = weight(n, k, 4, group_size, symmetric, seed=7)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(8))
    ref = x @ dequantize_words(words, scales, zeros, 4, group_size, k, torch.float32).T
    assert rel_err(cpu_fused.matmul(x, words, scales, zeros, 4, group_size, k), ref) < REL_TOL[torch.float32]


@pytest.mark.parametrize("bits,group_size", [(4, 64), (4, 32), (2, 64), (8, 32), (4, 16), (4, 8)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", [1, 3, 5])
@pytest.mark.parametrize("k", [512, 576, 608])
def test_groups_shorter_than_a_vector_share_one(bits, group_size, symmetric, m, k):
    """Rows in groups of 1 to 8 words: each 16-word vector spans 2 to 16 groups, every lane with
    its own group's scale and zero point (1 to 4 rows of x at a time). At K = 576 and 608 a row is
    not a multiple of 16 words (4-bit: 72 and 76), and at 608 its last group is shorter: the last
    vector has live lanes only up to the row's end."""
    n = 24
    words, scales, zeros = weight(n, k, bits, group_size, symmetric, seed=3)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(4))
    ref = x @ dequantize_words(words, scales, zeros, bits, group_size, k, torch.float32).T
    assert rel_err(cpu_fused.matmul(x, words, scales, zeros, bits, group_size, k), ref) < REL_TOL[torch.float32]


@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, 64), (2, 128), (8, 64), (4, 32)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", [1, 3, 5])
@pytest.mark.parametrize("k", [512, 576, 608])
def test_2_4_groups_shorter_than_a_vector_share_one(bits, group_size, symmetric, m, k):
    """The same for 2:4 kept codes: groups of 2 to 8 code words (4-bit codes in groups of 128
    columns: 64 kept codes, 8 words), rows of 32, 36 and 38 code words at 4 bits."""
    n = 24
    words, positions, scales, zeros = sp24_weight(n, k, bits, group_size, symmetric, seed=5)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(6))
    ref = x @ dequantize_sp24_words(words, positions, scales, zeros, bits, group_size, k, torch.float32).T
    y = cpu_fused.sp24_matmul(x, words, positions, scales, zeros, bits, group_size, k)
    assert rel_err(y, ref) < REL_TOL[torch.float32]


def _cpu_flags() -> set[str]:
    try:
        line = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def build_for(march: str, needs: str, monkeypatch) -> None:
    """The kernels built with -march=`march` (as on a CPU without AVX-512) and loaded for this
    test; skipped where this CPU lacks `needs`."""
    if needs not in _cpu_flags():
        pytest.skip(f"this CPU lacks {needs}")
    monkeypatch.setattr(cpu_native, "_FLAGS", (cpu_native._FLAGS[0], [f"-march={march}", "-fopenmp"],
                                                [f"-march={march}"]))
    source = (Path(cpu_native.__file__).parent / "csrc" / cpu_native.SOURCE).read_bytes()
    monkeypatch.setattr(cpu_native, "_library", cpu_native.load(source))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 instruction set levels")
@pytest.mark.parametrize("march,needs", [("x86-64", "sse2"), ("x86-64-v3", "avx2")])
def test_other_instruction_sets_compute_the_same(march, needs, monkeypatch):
    """The kernels as CPUs without AVX-512 run them (SSE2 only; AVX2 and F16C), built here with
    -march=...: vectors of 8 (AVX2) or 4 words where AVX-512 takes 16 (a group at a time, its last
    words one by one), fp16 scales converted one by one or 8 at a time, the 2:4 float values' slots
    a part of a position word, the dequantization a code at a time."""
    build_for(march, needs, monkeypatch)
    for bits, group_size, symmetric, k in ((4, 64, True, 576), (4, 128, False, 576), (4, 32, False, 608),
                                           (2, 64, True, 608), (8, 1 << 30, False, 576), (8, 16, True, 608),
                                           (4, 48, True, 576)):
        words, scales, zeros = weight(24, k, bits, group_size, symmetric, seed=bits + k)
        for m in (1, 3, 9):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            ref = x @ dequantize_words(words, scales, zeros, bits, group_size, k, torch.float32).T
            y = cpu_fused.matmul(x, words, scales, zeros, bits, group_size, k)
            assert rel_err(y, ref) < REL_TOL[torch.float32], (bits, group_size, symmetric, k, m)
    for bits, group_size, k in ((4, 64, 576), (4, 128, 608), (8, 1 << 30, 576)):
        words, positions, scales, zeros = sp24_weight(24, k, bits, group_size, False, seed=k)
        x = torch.randn(5, k, generator=torch.Generator().manual_seed(k))
        ref = x @ dequantize_sp24_words(words, positions, scales, zeros, bits, group_size, k, torch.float32).T
        y = cpu_fused.sp24_matmul(x, words, positions, scales, zeros, bits, group_size, k)
        assert rel_err(y, ref) < 1e-6, (bits, group_size, k)
    for dtype, k in ((torch.float32, 200), (torch.float16, 608), (torch.bfloat16, 576)):  # 2:4 float values
        values, positions = sp24_values(24, k, dtype, seed=k)
        x = torch.randn(3, k, generator=torch.Generator().manual_seed(k))
        ref = x @ dense_sp24_values(values, positions, k, torch.float32).T
        assert rel_err(cpu_fused.sp24_float_matmul(x, values, positions, k), ref) < 1e-6, (dtype, k)
    for bits, group_size in ((4, 64), (2, 32), (8, 16), (4, 8)):  # 16 words at a time, and a code at a time
        words, scales, zeros = weight(24, 608, bits, group_size, False, seed=bits)
        w = cpu_dequantize.dequantize(words, scales, zeros, bits, group_size, 608, torch.float32)
        assert torch.equal(w, dequantize_words(words, scales, zeros, bits, group_size, 608, torch.float32))
    assert [cpu_fused.sp24_max_m(span) for span in (None, 64, 16)] == [8, 8, 8]  # selects: fewer rows


def test_2_4_kernels_take_rows_by_their_path():
    """With AVX-512 (this build), float values and codes in groups of 32 columns or more take 16
    kept values a vector and serve up to 32 rows of x under "auto"; shorter groups 16."""
    if "avx512f" not in _cpu_flags():
        pytest.skip("this CPU lacks AVX-512 (test_other_instruction_sets_compute_the_same covers the rest)")
    assert [cpu_fused.sp24_max_m(span) for span in (None, 64, 128, 576, 16, 48)] == [32, 32, 32, 32, 16, 16]
    layer = sparse_quant_layer(256, 4, 16).prepack()
    assert layer._fused.max_m == 16 and sparse_quant_layer(256, 4, 64).prepack()._fused.max_m == 32


def test_many_rows_and_long_rows_match_the_reference():
    """Rows of x past 8 (the kernel takes 8 at a time), rows of K past its chunk of x, groups
    shorter than a vector, a weight whose rows are strided (a view of wider words)."""
    for m, n, k, bits, group_size in ((19, 33, 192, 4, 64), (3, 17, 4160, 8, 1 << 30), (2, 16, 2080, 2, 32),
                                      (9, 24, 1152, 4, 16)):
        words, scales, zeros = weight(n, k, bits, group_size, False)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
        ref = x @ dequantize_words(words, scales, zeros, bits, group_size, k, torch.float32).T
        assert rel_err(cpu_fused.matmul(x, words, scales, zeros, bits, group_size, k), ref) < REL_TOL[torch.float32]
    wide = torch.cat([words, words], dim=1)[:, :words.shape[1]]  # rows 2 * n_words apart
    assert torch.equal(cpu_fused.matmul(x, wide, scales, zeros, 4, 16, k), cpu_fused.matmul(x, words, scales, zeros,
                                                                                            4, 16, k))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_every_scale_dtype_and_fp16_activations(scale_dtype):
    words, scales, zeros = weight(24, 128, 4, 32, False)
    sp_words, positions, sp_scales, sp_zeros = sp24_weight(24, 128, 4, 32, False)
    scales, sp_scales = scales.to(scale_dtype), sp_scales.to(scale_dtype)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    ref = x @ dequantize_words(words, scales, zeros, 4, 32, 128, torch.float32).T
    ref24 = x @ dequantize_sp24_words(sp_words, positions, sp_scales, sp_zeros, 4, 32, 128, torch.float32).T
    assert rel_err(cpu_fused.matmul(x, words, scales, zeros, 4, 32, 128), ref) < REL_TOL[torch.float32]
    assert rel_err(cpu_fused.sp24_matmul(x, sp_words, positions, sp_scales, sp_zeros, 4, 32, 128), ref24) < 1e-6
    y = cpu_fused.matmul(x.half(), words, scales, zeros, 4, 32, 128)
    assert y.dtype == torch.float16 and rel_err(y, ref) < 1e-3  # x and y rounded to fp16: measured 3e-4


def test_no_rows_and_another_default_dtype():
    words, scales, zeros = weight(16, 64, 4, 32, True)
    assert cpu_fused.matmul(torch.randn(0, 64), words, scales, zeros, 4, 32, 64).shape == (0, 16)
    values, positions = sp24_values(16, 64, torch.float32)
    assert cpu_fused.sp24_float_matmul(torch.randn(0, 64), values, positions, 64).shape == (0, 16)
    x = torch.randn(2, 64)
    ref = x @ dequantize_words(words, scales, zeros, 4, 32, 64, torch.float32).T
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)  # the kernels still write fp32
        assert rel_err(cpu_fused.matmul(x, words, scales, zeros, 4, 32, 64), ref) < REL_TOL[torch.float32]
    finally:
        torch.set_default_dtype(default)


def test_formats_and_sizes_that_do_not_match_are_refused():
    words, scales, zeros = weight(16, 64, 4, 32, True)
    with pytest.raises(ValueError, match="do not read 4-bit codes in groups of 4 \\(K = 64\\)"):
        cpu_fused.matmul(torch.randn(1, 64), words, torch.rand(16, 16).half(), None, 4, 4, 64)
    with pytest.raises(ValueError, match="do not read 3-bit codes"):
        cpu_fused.matmul(torch.randn(1, 64), words, scales, zeros, 3, 32, 64)
    with pytest.raises(ValueError, match="takes CPU activations \\[..., 64\\], not cpu activations \\(1, 63\\)"):
        cpu_fused.matmul(torch.randn(1, 63), words, scales, zeros, 4, 32, 64)
    with pytest.raises(ValueError, match="uint8 zeros"):
        cpu_fused.matmul(torch.randn(1, 64), words, scales, torch.zeros(2, 16), 4, 32, 64)
    sp_words, positions, sp_scales, _ = sp24_weight(16, 64, 4, 32, True)
    with pytest.raises(ValueError, match="positions \\(8, 2\\) \\(torch.int32\\) for 16 rows of 32 kept values"):
        cpu_fused.sp24_matmul(torch.randn(1, 64), sp_words, positions[:8], sp_scales, None, 4, 32, 64)


def test_sizes_that_do_not_match_are_refused():
    words, scales, zeros = weight(16, 128, 4, 32, True)
    with pytest.raises(ValueError, match="expected 4 x 16 scales"):
        cpu_fused.matmul(torch.randn(1, 128), words, scales[:3], zeros, 4, 32, 128)
    with pytest.raises(ValueError, match="words \\(16, 8\\)"):
        cpu_fused.matmul(torch.randn(1, 256), words[:, :8], scales, zeros, 4, 32, 256)
    words, positions, scales, zeros = sp24_weight(16, 256, 4, 64, True)
    with pytest.raises(ValueError, match="positions \\(16, 4\\) \\(torch.int32\\) for 16 rows of 128 kept values"):
        cpu_fused.sp24_matmul(torch.randn(1, 256), words, positions[:, :4], scales, zeros, 4, 64, 256)


def test_the_kernel_is_built_once_and_cached(tmp_path):
    """A fresh process and an empty cache build it; the next process loads the cached library."""
    script = textwrap.dedent("""
        import torch
        from compress.cuda import cpu_dequantize, cpu_fused, cpu_native
        words = torch.randint(-2**31, 2**31 - 1, (16, 8), dtype=torch.int32)
        y = cpu_fused.matmul(torch.randn(1, 64), words, torch.rand(2, 16).half(), None, 4, 32, 64)
        print(y is not None, cpu_native.failure())
    """)
    env = {**os.environ, "COMPRESS_CACHE": str(tmp_path)}
    stamps = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0 and out.stdout.split() == ["True", "None"], out.stderr[-2000:]
        built = list((tmp_path / "kernels").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"  # no temporary files left
        stamps.append(built[0].stat().st_mtime_ns)
    assert stamps[0] == stamps[1]


@pytest.mark.parametrize("prepacked", [True, False])
def test_auto_runs_it_for_few_rows_of_x_on_cpu(prepacked, monkeypatch):
    """Prepacked, a layer holds its weight checked for the kernel (cpu_fused.FusedWeight), which
    fp32 calls take directly (ops.fused_linear); else each call checks it (cpu_fused.matmul)."""
    torch.manual_seed(0)
    q = RTNConfig(bits=4, group_size=32).build().compress("l", nn.Linear(128, 48))
    if prepacked:
        q.prepack()
    assert (q._fused is not None) == prepacked
    calls = []
    call = cpu_fused.FusedWeight.__call__
    monkeypatch.setattr(cpu_fused.FusedWeight, "__call__",
                        lambda self, x: calls.append(x.numel() // x.shape[-1]) or call(self, x))
    for m in (1, cpu_fused.MAX_M, cpu_fused.MAX_M + 1):
        x = torch.randn(1, m, 128)
        assert rel_err(q(x), x @ q.dequantized_weight().T + q.bias) < REL_TOL[torch.float32]
    assert calls == [1, cpu_fused.MAX_M]  # above MAX_M rows: dequantize (cpu_dequantize.py), then matmul
    xt = torch.randn(128, 3, 2).permute(2, 1, 0)  # [2, 3, 128], not contiguous: read as 6 rows
    yt = q(xt)
    assert yt.shape == (2, 3, 48) and rel_err(yt, xt @ q.dequantized_weight().T + q.bias) < REL_TOL[torch.float32]
    assert calls == [1, cpu_fused.MAX_M, 6]
    calls.pop()
    q.set_kernel("reference")(x)
    q.set_kernel("cpu_fused")(x)  # forced: any number of rows
    assert calls == [1, cpu_fused.MAX_M, cpu_fused.MAX_M + 1]
    x16 = x[:, :1].half()  # fp16: not the prepacked fast path, int_linear's (cpu_fused.matmul)
    y16 = q.set_kernel("auto")(x16)
    assert y16.dtype == torch.float16 and rel_err(y16, x16.float() @ q.dequantized_weight().T + q.bias) < 1e-3
    assert calls[3:] == [1]
    q.to(torch.float64)  # moved or cast: the derived layout is dropped
    assert q._fused is None


@pytest.mark.parametrize("kind", ["int", "2:4 int", "2:4 float"])
def test_a_deep_copy_of_a_prepacked_layer_reads_its_own_words(kind):
    torch.manual_seed(0)
    q = {"int": lambda: RTNConfig(bits=4, group_size=32).build().compress("l", nn.Linear(128, 48)),
         "2:4 int": lambda: sparse_quant_layer(128, 4, 32), "2:4 float": lambda: sparse_layer(48, 128)}[kind]()
    q.prepack(torch.float32)
    x = torch.randn(2, 128)
    ref = q(x)
    twin = copy.deepcopy(q)
    theirs = {t.data_ptr() for t in q._fused._tensors if t is not None}
    assert twin._fused is not None and not theirs & {t.data_ptr() for t in twin._fused._tensors if t is not None}
    del q
    gc.collect()
    assert torch.equal(twin(x), ref)


def test_formats_it_cannot_read_run_the_reference():
    torch.manual_seed(0)
    x = torch.randn(1, 200)
    q = RTNConfig(bits=2, group_size=64).build().compress("l", nn.Linear(200, 16)).prepack()  # a word across groups
    assert not cpu_fused.applies(2, 64, 200) and cpu_fused.applies(2, 64, 208) and not cpu_fused.applies(2, 8, 64)
    assert not cpu_fused.applies(8, -1, 64) and not cpu_fused.sp24_applies(4, 0, 64)
    assert torch.equal(q(x), q.set_kernel("reference")(x))  # the reference ran
    q.set_kernel("auto")
    with pytest.raises(ValueError, match="kernel 'cpu_fused' takes CPU activations and 2, 4 or 8-bit words in "
                                         "groups of whole 32-bit words, not cpu activations with 2-bit codes in "
                                         "groups of 64 \\(K = 200\\)"):
        q.set_kernel("cpu_fused")(x)
    # 3-bit codes are read as the 4-bit words they widen to
    q3 = RTNConfig(bits=3, group_size=64).build().compress("l", nn.Linear(256, 16)).prepack()
    x3 = torch.randn(1, 256)
    assert rel_err(q3.set_kernel("cpu_fused")(x3), x3 @ q3.dequantized_weight().T + q3.bias) < REL_TOL[torch.float32]


def test_a_build_failure_turns_the_path_off_with_one_warning(monkeypatch):
    monkeypatch.setattr(cpu_native, "_library", None)  # all three restored after the test
    monkeypatch.setattr(cpu_native, "_failure", None)
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    torch.manual_seed(0)
    q = RTNConfig(bits=4, group_size=32).build().compress("l", nn.Linear(64, 16)).prepack()
    layer = sparse_quant_layer(64, 4, 32)
    values = sparse_layer(16, 64)
    x = torch.randn(1, 64)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ CPU kernels could not be built \\(the C\\+\\+ compiler "
                                            "'/nonexistent/g\\+\\+' \\(CXX\\) was not found\\)"):
        y = q(x)
    assert torch.equal(y, q.set_kernel("reference")(x))  # the reference ran
    assert torch.equal(layer(x), layer.set_kernel("reference")(x))  # 2:4 layers too, without a second warning
    assert torch.equal(values(x), values.set_kernel("reference")(x))
    assert not cpu_fused.available()
    for module in (q, layer, values):
        with pytest.raises(ValueError, match="kernel 'cpu_fused' could not be built \\(the C\\+\\+ compiler"):
            module.set_kernel("cpu_fused")(x)


def test_without_a_cxx_compiler_the_reference_runs(tmp_path):
    """A real failure, in a fresh process with an empty cache and no compiler to find."""
    script = textwrap.dedent("""
        import warnings, torch
        from compress.cuda import cpu_fused
        from compress.cuda.ops import int_linear, sp24_int_linear
        words = torch.randint(-2**31, 2**31 - 1, (16, 8), dtype=torch.int32)
        positions = torch.full((16, 4), 0x44444444, dtype=torch.int32)  # kept codes in slots 0 and 1
        scales = torch.rand(2, 16).half()
        x, x24 = torch.randn(1, 64), torch.randn(1, 128)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = int_linear(x, words, scales, None, 4, 32, 64)
            y24 = sp24_int_linear(x24, words, positions, scales, None, 4, 64, 128)
        ref = int_linear(x, words, scales, None, 4, 32, 64, kernel="reference")
        ref24 = sp24_int_linear(x24, words, positions, scales, None, 4, 64, 128, kernel="reference")
        ours = [str(w.message) for w in caught if str(w.message).startswith("compress:")]
        print(torch.equal(y, ref), torch.equal(y24, ref24), cpu_fused.available(), len(ours), *ours)
    """)
    env = {**os.environ, "COMPRESS_CACHE": str(tmp_path), "CXX": "/nonexistent/g++"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("True True False 1 compress: the C++ CPU kernels could not be built (the C++ "
                                 "compiler '/nonexistent/g++' (CXX) was not found)"), out.stdout


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


def test_eager_calls_skip_the_ops_dispatch_where_no_gradient_is_recorded(monkeypatch):
    """The three layers' eager no-grad calls run the ops' implementations as plain functions (the
    same result); calls that record a gradient, compiled, traced (make_fx) or vmapped ones go
    through the op (without grad mode its no-grad twin), where the C++ kernels' raw pointers
    cannot bypass the tracer."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from compress.cuda import ops

    torch.manual_seed(0)
    weight_ = torch.randn(32, 64)
    keep = nm_mask(weight_.abs(), 2, 4)
    grid = compute_grid(weight_ * keep, 4, 32, True)
    layers = {"int_linear_op": RTNConfig(bits=4, group_size=32).build().compress("l", nn.Linear(64, 32)).prepack(),
              "sp24_int_linear_op": SparseQuantLinear.from_codes(quantize(weight_, grid), keep, grid, "2:4", 0.5, None,
                                                                 "float16", "l").prepack(),
              "sp24_linear_op": SparseLinear.from_pruned(weight_, keep, "2:4", None, None, "l").prepack()}
    calls = []
    for name in layers:
        for attr in (name, name.removesuffix("_op") + "_no_grad"):
            op = getattr(ops, attr)
            monkeypatch.setattr(ops, attr, lambda *a, _op=op, _attr=attr: calls.append(_attr) or _op(*a))
    x = torch.randn(2, 64, requires_grad=True)
    for name, layer in layers.items():
        twin = name.removesuffix("_op") + "_no_grad"
        with torch.no_grad():
            direct = layer(x)
        assert calls == []
        recorded = layer(x)
        assert calls == [name] and recorded.grad_fn is not None and torch.equal(recorded.detach(), direct)
        with torch.inference_mode():
            assert torch.equal(layer(x.detach()), direct)
        assert calls == [name]
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        with torch.no_grad():
            assert torch.allclose(compiled(x), direct, atol=1e-5, rtol=1e-5)
            traced = make_fx(layer)(x.detach())
            assert f"compress.{twin}" in str(traced.graph), traced.graph
            assert torch.allclose(torch.vmap(layer)(x.unsqueeze(1)).squeeze(1), direct, atol=1e-5, rtol=1e-5)
        assert calls == [name] + [twin] * 3, name
        calls.clear()


def test_float64_activations_keep_the_reference():
    torch.manual_seed(0)
    q = RTNConfig(bits=4, group_size=32).build().compress("l", nn.Linear(64, 16)).prepack()
    x = torch.randn(1, 64, dtype=torch.float64)
    assert torch.equal(q(x), q.set_kernel("reference")(x))


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


def test_2_4_many_rows_and_long_rows_match_the_reference():
    """Rows of x past 8 and 4 (the 2:4 kernels take 8 at a time with AVX-512, 4 against planes), rows
    past their chunk of x, strided rows;
    rows whose kept codes end past a tile of 16 (K = 592: 296 kept, 600: 300) in a shorter group."""
    for m, n, k, bits, group_size in ((9, 33, 2080, 4, 64), (6, 17, 2112, 2, 1 << 30), (3, 21, 592, 4, 64),
                                      (2, 19, 600, 8, 32), (5, 20, 1152, 8, 8)):
        words, positions, scales, zeros = sp24_weight(n, k, bits, group_size, False)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
        ref = x @ dequantize_sp24_words(words, positions, scales, zeros, bits, group_size, k, torch.float32).T
        assert rel_err(cpu_fused.sp24_matmul(x, words, positions, scales, zeros, bits, group_size, k), ref) < 1e-6
    wide = torch.cat([positions, positions], dim=1)[:, :positions.shape[1]]
    assert torch.equal(cpu_fused.sp24_matmul(x, words, wide, scales, zeros, 8, 8, k),
                       cpu_fused.sp24_matmul(x, words, positions, scales, zeros, 8, 8, k))


def sparse_quant_layer(k: int, bits: int, group_size: int) -> SparseQuantLinear:
    torch.manual_seed(0)
    w = torch.randn(48, k)
    keep = nm_mask(w.abs(), 2, 4)
    grid = compute_grid(w * keep, bits, group_size, False)
    return SparseQuantLinear.from_codes(quantize(w, grid), keep, grid, "2:4", 0.5, torch.randn(48), "float16", "l")


@pytest.mark.parametrize("prepacked", [True, False])
def test_2_4_layers_run_it_for_few_rows_of_x_on_cpu(prepacked, monkeypatch):
    """Prepacked, the layer holds its codes checked for the kernel (cpu_fused.FusedSp24Weight),
    which calls of fp32, fp16 or bf16 rows take directly (ops.fused_linear); else each call checks
    them (cpu_fused.sp24_matmul)."""
    layer = sparse_quant_layer(272, 4, 64)  # 4 groups and a last one of 16 columns
    if prepacked:
        layer.prepack()
    assert (layer._fused is not None) == prepacked
    calls = []
    call = cpu_fused.FusedSp24Weight.__call__
    monkeypatch.setattr(cpu_fused.FusedSp24Weight, "__call__",
                        lambda self, x: calls.append(x.numel() // x.shape[-1]) or call(self, x))
    most = cpu_fused.sp24_max_m(64)
    for m in (1, most, most + 1):
        x = torch.randn(m, 272)
        assert rel_err(layer(x), x @ layer.dequantized_weight().T + layer.bias) < 1e-6
    assert calls == [1, most]
    xt = torch.randn(272, 3, 2).permute(2, 1, 0)  # [2, 3, 272], not contiguous: read as 6 rows
    yt = layer(xt)
    assert yt.shape == (2, 3, 48) and rel_err(yt, xt @ layer.dequantized_weight().T + layer.bias) < 1e-6
    assert calls.pop() == 6
    x16 = x[:2].bfloat16()
    y16 = layer(x16)
    ref16 = x16.float() @ layer.dequantized_weight().T + layer.bias
    assert y16.dtype == torch.bfloat16 and rel_err(y16, ref16) < 5e-3  # y rounded to bf16: measured <= 2.8e-3
    assert calls == [1, most, 2]
    layer.set_kernel("cpu_fused")(x)
    assert calls == [1, most, 2, most + 1]
    layer.to(torch.float64)  # moved or cast: the derived layout is dropped
    assert layer._fused is None and layer._prepacked is None
    calls.clear()
    short = sparse_quant_layer(200, 4, 64)  # a last group of 8 columns, half a code word: the reference
    x = torch.randn(1, 200)
    assert rel_err(short(x), x @ short.dequantized_weight().T + short.bias) < 1e-6
    assert calls == [] and short.prepack()._fused is None
    with pytest.raises(ValueError, match="kernel 'cpu_fused' takes CPU activations and 2:4 weights of 2, 4 or "
                                         "8-bit codes in groups of whole 32-bit code words"):
        short.set_kernel("cpu_fused")(x)


def sp24_values(n: int, k: int, dtype: torch.dtype, seed: int = 0):
    """Kept float values and their slots' position words, as SparseLinear's kernel_layout gives them."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, 3, (n, k // 4), generator=g)
    second = torch.maximum(torch.randint(0, 4, (n, k // 4), generator=g), first + 1)
    slots = torch.stack([first, second], dim=-1).reshape(n, k // 2).to(torch.uint8)
    return torch.randn(n, k // 2, generator=g).to(dtype), words_of(pack_codes(slots, 2))


@pytest.mark.parametrize("values_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 40, 192), (5, 33, 200), (9, 17, 2120)])  # K / 2 past and off 16, chunks
def test_float_2_4_matmul_matches_the_reference(values_dtype, m, n, k):
    values, positions = sp24_values(n, k, values_dtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    ref = x @ dense_sp24_values(values, positions, k, torch.float32).T
    y = cpu_fused.sp24_float_matmul(x, values, positions, k)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert rel_err(y, ref) < 1e-6  # measured <= 2.4e-7
    y16 = cpu_fused.sp24_float_matmul(x.bfloat16(), values, positions, k)
    assert y16.dtype == torch.bfloat16 and rel_err(y16, ref) < 5e-3  # x rounded to bf16: measured <= 3e-3


def test_float_2_4_sizes_that_do_not_match_are_refused():
    values, positions = sp24_values(16, 256, torch.float32)
    with pytest.raises(ValueError, match="positions \\(16, 2\\) \\(torch.int32\\) for 16 rows of 128 kept values"):
        cpu_fused.sp24_float_matmul(torch.randn(1, 256), values, positions[:, :2], 256)


def sparse_layer(n: int, k: int) -> SparseLinear:
    torch.manual_seed(0)
    w = torch.randn(n, k)
    return SparseLinear.from_pruned(w, nm_mask(w.abs(), 2, 4), "2:4", None, torch.randn(n), "l")


@pytest.mark.parametrize("prepacked", [True, False])
def test_2_4_float_layers_run_it_for_few_rows_of_x_on_cpu(prepacked, monkeypatch):
    layer = sparse_layer(48, 200)
    if prepacked:
        layer.prepack(torch.float32)
    assert (layer._fused is not None) == prepacked  # cpu_fused.FusedSp24Values, as for codes
    calls = []
    call = cpu_fused.FusedSp24Values.__call__
    monkeypatch.setattr(cpu_fused.FusedSp24Values, "__call__",
                        lambda self, x: calls.append(x.numel() // x.shape[-1]) or call(self, x))
    most = cpu_fused.sp24_max_m()
    for m in (1, most, most + 1):
        x = torch.randn(m, 200)
        assert rel_err(layer(x), x @ layer.dequantized_weight().T + layer.bias) < 1e-6
    assert calls == [1, most]  # above `most` rows: dequantize, then matmul
    xt = torch.randn(200, 3, 2).permute(2, 1, 0)  # [2, 3, 200], not contiguous: read as 6 rows
    yt = layer(xt)
    assert yt.shape == (2, 3, 48) and rel_err(yt, xt @ layer.dequantized_weight().T + layer.bias) < 1e-6
    assert calls.pop() == 6
    layer.set_kernel("cpu_fused")(x)
    assert calls == [1, most, most + 1]
    layer.set_kernel("reference")(x[:1])  # forced reference: not the kernel
    double = sparse_layer(16, 64).double()  # float64 values: the reference keeps their precision
    with pytest.raises(ValueError, match="kernel 'cpu_fused' takes CPU activations and 2:4 weights of fp32, fp16 or "
                                         "bf16 values, not cpu activations with torch.float64 values \\(K = 64\\)"):
        sp24_linear(torch.randn(1, 64).double(), *double.kernel_layout()[:2], "cpu_fused")
    assert calls == [1, most, most + 1]
