"""2:4 sparse kernels, for integer weights (the SparseQuantLinear format) and float weights (the
SparseLinear format), against the reference semantics (cuda/layout.dequantize_sp24_words and
dense_sp24_values), in the interpreter on CPU (fp32) or compiled on a
GPU (fp16 and bf16), with the tolerances of test_int_kernels.py."""

from __future__ import annotations

import pytest
import torch

from compress.cuda import int_matmul as im
from compress.cuda.layout import dense_sp24_values, dequantize_sp24_words, words_of
from compress.cuda.ops import (dense_sp24, dequantize_sp24_int, sp24_int_linear, sp24_int_linear_no_grad,
                               sp24_int_linear_op, sp24_linear_no_grad, sp24_linear_op)
from compress.quant.packing import pack_codes
from compress.quant.quantize import compute_grid, quantize
from compress.quant.rtn import RTNConfig
from compress.sparsity.layers import SparseLinear
from compress.sparsity.masks import nm_mask
from compress.sparsity.sparse_quant import SparseQuantLinear

from .test_int_kernels import CUDA, DEVICE, DTYPES, REL_TOL, exact_inputs, rel_err

# (N, K, bits, group_size, symmetric); group_size None = per-channel
FORMATS = [
    (50, 192, 4, 64, True),  # N tail, K tail inside a tile
    (40, 256, 4, 128, False),  # asymmetric, tiles of several groups
    (24, 160, 8, None, True),  # per-channel, 5 tiles of 32
    (33, 128, 2, 32, False),
]


def make_sp24(n, k, bits, group_size, symmetric, seed=0) -> im.IntWeight:
    g = torch.Generator().manual_seed(seed)
    kept = torch.randint(0, 2**bits, (n, k // 2), dtype=torch.uint8, generator=g)
    # two distinct slots of every group of 4, ascending as the checkpoint stores them
    slots = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2].sort(-1).values
    groups = 1 if group_size is None else -(-k // group_size)
    scales = (torch.rand(groups, n, generator=g) * 0.1 + 0.01).half()
    zeros = None if symmetric else torch.randint(0, 2**bits, (groups, n), dtype=torch.uint8, generator=g)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return im.IntWeight(to(words_of(pack_codes(kept, bits))), to(scales), to(zeros), bits, group_size or k, k,
                        positions=to(words_of(pack_codes(slots.reshape(n, -1).to(torch.uint8), 2))))


def reference(x: torch.Tensor, w: im.IntWeight) -> torch.Tensor:
    return x.float() @ dense_of(w, torch.float32).T


def test_reference_keeps_two_of_every_four():
    w = make_sp24(8, 64, 4, 32, False)
    dense = dequantize_sp24_words(w.words, w.positions, w.scales, w.zeros, 4, 32, 64, torch.float32)
    assert ((dense != 0).view(8, 16, 4).sum(-1) <= 2).all()
    assert (dense != 0).float().mean() > 0.4  # codes equal to the zero point also give 0


@pytest.mark.parametrize("bits,symmetric", [(4, False), (3, True)])  # 3 bits: codes widened to 4 at prepack
def test_module_runs_the_op_and_its_kernels_as_its_reference(bits, symmetric):
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    keep = nm_mask(w.abs(), 2, 4)
    grid = compute_grid(w * keep, bits, 64, symmetric)
    m = SparseQuantLinear.from_codes(quantize(w, grid), keep, grid, "2:4", 0.5, torch.randn(48), "float16", "l")
    assert m.runs_sp24_op
    x = torch.randn(2, 3, 256)
    want = torch.nn.functional.linear(x, m.dequantized_weight(), m.bias)
    assert torch.allclose(m(x), want, atol=1e-5)  # CPU "auto": the op's reference, the module's own weight
    m = m.to(DEVICE).set_kernel("triton").prepack()
    assert rel_err(m(x.to(DEVICE)) - m.bias, (want - m.bias.cpu()).to(DEVICE)) < REL_TOL[torch.float32]
    with pytest.raises(ValueError, match="2:4 weights of 2, 4 or 8 bits with K and the groups multiples of 32"):
        sp24_int_linear(x[0, :, :48], *m.kernel_layout()[:4], 4, 16, 48, "triton")


# 2:4 float weights (SparseLinear): the kept values themselves, 16 bits on a GPU (fp32 in the
# interpreter, where the kernels compute in fp32 whatever the values' dtype)
VALUE_SHAPES = [(50, 192), (33, 160), (64, 256)]  # N tails, K tails inside a tile of 128


def make_sp24_values(n, k, dtype, seed=0) -> im.IntWeight:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, k // 2, generator=g).to(dtype)
    slots = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2].sort(-1).values
    positions = words_of(pack_codes(slots.reshape(n, -1).to(torch.uint8), 2))
    return im.sp24_values(values.to(DEVICE), positions.to(DEVICE))


def test_values_reference_is_the_modules_decompression():
    torch.manual_seed(0)
    weight = torch.randn(24, 96)
    layer = SparseLinear.from_pruned(weight, nm_mask(weight.abs(), 2, 4), "2:4", None, None, "l")
    values, positions, _ = layer.kernel_layout()
    assert torch.equal(dense_sp24_values(values, positions, 96, torch.float32), layer.dequantized_weight())


# Both 2:4 formats: integer codes (a FORMATS entry) and float values ((N, K) of VALUE_SHAPES)
WEIGHTS = FORMATS + [(40, 128, 2, 64, False)] + VALUE_SHAPES  # 2 bits in groups of 64: the swapped kernel's tiles


def make(spec: tuple, dtype: torch.dtype) -> im.IntWeight:
    return make_sp24(*spec) if len(spec) == 5 else make_sp24_values(*spec, dtype)


def dense_of(w: im.IntWeight, dtype: torch.dtype) -> torch.Tensor:
    """The reference dense weight [N, K] of either 2:4 format."""
    if w.bits == 16:
        return dense_sp24_values(w.words, w.positions, w.in_features, dtype)
    return dequantize_sp24_words(w.words, w.positions, w.scales, w.zeros, w.bits, w.group_size, w.in_features, dtype)


@pytest.mark.parametrize("spec", WEIGHTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sp24_dequant_kernel_is_exact(spec, dtype):
    w = make(spec, dtype)
    assert torch.equal(im.dequantize(w, dtype, block_n=16), dense_of(w, dtype))


@pytest.mark.parametrize("spec", WEIGHTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_n,block_k", [(16, 64), (8, 128), (4, 512)])
def test_sp24_gemv_kernel(spec, dtype, block_n, block_k):
    w = make(spec, dtype)
    if not im.block_k_fits(block_k, w.group, w.bits, sp24=True):
        pytest.skip("tile does not fit the groups")
    x = torch.randn(1, w.in_features, device=DEVICE).to(dtype)
    y = im.gemv(x, w, block_n, block_k)
    assert y.shape == (1, w.out_features) and rel_err(y, reference(x, w)) < REL_TOL[dtype]


@pytest.mark.parametrize("spec", FORMATS + [(16, 1088, 4, 64, False)])
@pytest.mark.parametrize("block_n,block_k", [(16, 64), (8, 512)])
def test_sp24_int_gemv_is_exact_on_integer_inputs(spec, block_n, block_k):
    """The 2:4 integer GEMV picks each kept code's x by its slot and scales per 32 columns: exact
    against the reference on integer inputs (`exact_inputs`), K tails and multi-group tiles included."""
    x, w = exact_inputs(make_sp24(*spec))
    if not im.block_k_fits(block_k, w.group, w.bits, sp24=True):
        pytest.skip("tile does not fit the groups")
    assert torch.equal(im.gemv(x, w, block_n, block_k), reference(x, w))


def test_sp24_tiles_need_groups_of_whole_position_words():
    assert not im.block_k_fits(64, 16, 4, sp24=True)  # a position word (32 columns) would span 2 groups
    assert im.block_k_fits(64, 32, 4, sp24=True) and im.block_k_fits(512, 1 << 30, 8, sp24=True)


@pytest.mark.parametrize("spec", WEIGHTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["dot", "mma"])
@pytest.mark.parametrize("m,config", [(1, (16, 32, 64, 2)), (5, (16, 64, 128, 1)), (33, (32, 32, 64, 1))])
def test_sp24_tensor_core_kernels(spec, dtype, kernel, m, config):
    """The first tensor-core kernel (a dense tile built in registers) and the swapped one (one
    MMA per slot), over N, M and K tails and split-K."""
    w = make(spec, dtype)
    fits = im.block_k_fits if kernel == "dot" else im.mma_fits
    if not fits(config[2], w.group, w.bits, sp24=True):
        pytest.skip("tile does not fit the groups")
    x = torch.randn(m, w.in_features, device=DEVICE).to(dtype)
    y = getattr(im, kernel)(x, w, *config)
    assert y.shape == (m, w.out_features) and rel_err(y, reference(x, w)) < REL_TOL[dtype]


def test_sp24_ops_pass_pytorch_opcheck():
    """The 2:4 float op and the no-grad twins of both 2:4 ops (the ops themselves with gradients:
    test_compressed_layers_pass_gradients_eager_and_compiled)."""
    w = make_sp24_values(16, 64, torch.float16)
    x = torch.randn(3, 64, device=DEVICE, dtype=torch.float16)
    q = make_sp24(16, 64, 4, 32, True)
    xq = torch.randn(3, 64, device=DEVICE)
    for op, args in ((sp24_linear_op, (x, w.words, w.positions, "reference", None)),
                     (sp24_linear_no_grad, (x, w.words, w.positions, "reference", None)),
                     (sp24_int_linear_no_grad, (xq, q.words, q.positions, q.scales, q.zeros, 4, 32, 64, "reference"))):
        results = torch.library.opcheck(op, args)
        assert {"test_schema", "test_faketensor", "test_aot_dispatch_dynamic"} <= set(results), results
        assert set(results.values()) == {"SUCCESS"}, (op, results)


def test_sparse_linear_runs_the_op_and_its_kernels_as_its_reference():
    torch.manual_seed(0)
    weight = torch.randn(48, 256)
    layer = SparseLinear.from_pruned(weight, nm_mask(weight.abs(), 2, 4), "2:4", None, torch.randn(48), "l")
    x = torch.randn(2, 3, 256)
    want = torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    assert torch.allclose(layer(x), want, atol=1e-5)  # CPU "auto": the op's reference
    half = SparseLinear.from_pruned(weight.half(), nm_mask(weight.abs(), 2, 4), "2:4", None, None, "l")
    half = half.to(DEVICE).set_kernel("triton").prepack(torch.float16)
    xh = x.half().to(DEVICE)
    ref = xh.float() @ half.dequantized_weight().T.to(DEVICE)
    assert rel_err(half(xh), ref) < REL_TOL[torch.float16]  # the kernels, in the interpreter on CPU
    assert rel_err(half(xh[:, :1]), ref[:, :1]) < REL_TOL[torch.float16]
    with pytest.raises(ValueError, match="16-bit values with K a multiple of 32 and activations of the same dtype"):
        half(xh.float())
    with pytest.raises(ValueError, match="unknown kernel 'cuda'"):
        half.set_kernel("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("m", [1, 16, 300])
def test_large_2of4_layers_on_gpu(m):
    """The chosen kernels are right for 2:4 float (with cuSPARSELt weighed where PyTorch has it) and
    2:4 + int4 weights, cuSPARSELt's own output too, and no candidate disagreed with the reference."""
    from compress.cuda import cusparselt

    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    w = make_sp24_values(4096, 4096, torch.bfloat16)
    ref = reference(x, w)
    if cusparselt.applies(4096, 4096, torch.bfloat16, x.device):
        packed = cusparselt.pack(dense_sp24_values(w.words, w.positions, 4096, torch.bfloat16))
        assert rel_err(cusparselt.matmul(x, packed), ref) < REL_TOL[torch.bfloat16]
        w = im.sp24_values(w.words, w.positions, packed)
    assert rel_err(im.int_matmul(x, w), ref) < REL_TOL[torch.bfloat16]
    wq = make_sp24(4096, 4096, 4, 128, True)
    assert rel_err(im.int_matmul(x, wq), reference(x, wq)) < REL_TOL[torch.bfloat16]
    assert not any(im.TUNER.rejected.values()), im.TUNER.rejected


@pytest.mark.parametrize("trained", [False, True], ids=["frozen", "trained"])
def test_compressed_layers_pass_gradients_eager_and_compiled(trained):
    """x's gradient through each op is grad @ W, as through a Linear holding the dequantized weight,
    eager and under torch.compile (the backward's W comes from the format's dequantizing op, which
    AOTAutograd traces; a C++ kernel called on its fake tensors failed the compilation before).
    Trained, the float buffers a user may train (the scales, the 2:4 values) get the gradients the
    reference dequantization gives them, through prepacked layers (whose layouts are copies made
    without one: dropped by each run, eager or compiled); they got none before. The RTN layer is
    3-bit asymmetric (codes widened at prepack), x [2, 3, 64]. opcheck checks every op's
    registrations, the autograd kernel's included."""
    torch.manual_seed(0)
    weight = torch.randn(24, 64)
    keep = nm_mask(weight.abs(), 2, 4)
    grid = compute_grid(weight * keep, 4, 32, False)
    layers = [SparseLinear.from_pruned(weight, keep, "2:4", None, torch.randn(24), "l"),
              SparseQuantLinear.from_codes(quantize(weight, grid), keep, grid, "2:4", 0.5, None, "float16", "l"),
              RTNConfig(bits=3, group_size=32, symmetric=False).build().compress("l", torch.nn.Linear(64, 24))]
    x0 = torch.randn(2, 3, 64)
    for layer in layers:
        name = "values" if isinstance(layer, SparseLinear) else "scales"
        layer.prepack().get_buffer(name).requires_grad_(trained)
        xr = x0.clone().requires_grad_()
        torch.nn.functional.linear(xr, layer.dequantized_weight(), layer.bias).pow(2).sum().backward()
        ref = layer.get_buffer(name).grad
        assert (ref is not None) == trained and (not trained or ref.abs().max() > 0)
        for run in (layer, torch.compile(layer, backend="aot_eager", fullgraph=True)):
            layer.prepack().get_buffer(name).grad = None  # each run meets the prepacked copies
            x = x0.clone().requires_grad_()
            run(x).pow(2).sum().backward()
            assert torch.allclose(x.grad, xr.grad, atol=1e-4), type(layer).__name__
            if trained:  # measured: equal, and 1.4e-7 relative for the 2:4 values (another summation order)
                got = layer.get_buffer(name).grad
                assert got is not None and rel_err(got.float(), ref.float()) < 1e-5, type(layer).__name__
        layer.get_buffer(name).requires_grad_(False)
    values, positions, _ = layers[0].kernel_layout()
    q = layers[1]
    words, q_positions, scales, zeros = q.kernel_layout()
    codes = (words, q_positions, scales, zeros, q.kernel_bits, q.group_size, q.in_features)
    trained_codes = (words, q_positions, scales.detach().requires_grad_(trained), *codes[3:])
    x = torch.randn(3, 64, requires_grad=True)
    for op, args in ((sp24_linear_op, (x, values.detach().requires_grad_(trained), positions, "reference", None)),
                     (sp24_int_linear_op, (x, *trained_codes, "auto")),
                     (dense_sp24, (values, positions, torch.float32, "auto")),
                     (dequantize_sp24_int, (*codes, torch.float32, "reference"))):
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, (op, results)
