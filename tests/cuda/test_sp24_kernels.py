"""2:4 sparse integer-weight kernels (the SparseQuantLinear format) against the reference
semantics (cuda/layout.dequantize_sp24_words), in the interpreter on CPU (fp32) or compiled on a
GPU (fp16 and bf16), with the tolerances of test_int_kernels.py."""

from __future__ import annotations

import pytest
import torch

from compress.cuda import int_matmul as im
from compress.cuda.layout import dequantize_sp24_words, words_of
from compress.cuda.ops import sp24_int_linear
from compress.quant.packing import pack_codes
from compress.quant.quantize import compute_grid, quantize
from compress.sparsity.masks import nm_mask
from compress.sparsity.sparse_quant import SparseQuantLinear

from .test_int_kernels import DEVICE, DTYPES, REL_TOL, rel_err

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
    dense = dequantize_sp24_words(w.words, w.positions, w.scales, w.zeros, w.bits, w.group_size, w.in_features,
                                  torch.float32)
    return x.float() @ dense.T


def test_reference_keeps_two_of_every_four():
    w = make_sp24(8, 64, 4, 32, False)
    dense = dequantize_sp24_words(w.words, w.positions, w.scales, w.zeros, 4, 32, 64, torch.float32)
    assert ((dense != 0).view(8, 16, 4).sum(-1) <= 2).all()
    assert (dense != 0).float().mean() > 0.4  # codes equal to the zero point also give 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sp24_dequant_kernel_is_exact(fmt, dtype):
    w = make_sp24(*fmt)
    dense = dequantize_sp24_words(w.words, w.positions, w.scales, w.zeros, w.bits, w.group_size, w.in_features,
                                  dtype)
    assert torch.equal(im.dequantize(w, dtype, block_n=16), dense)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_n,block_k", [(16, 32), (8, 128)])
def test_sp24_gemv_kernel(fmt, dtype, block_n, block_k):
    w = make_sp24(*fmt)
    if not im.block_k_fits(block_k, w.group, w.bits, sp24=True):
        pytest.skip("tile does not fit the groups")
    x = torch.randn(1, w.in_features, device=DEVICE).to(dtype)
    y = im.gemv(x, w, block_n, block_k)
    assert y.shape == (1, w.out_features) and rel_err(y, reference(x, w)) < REL_TOL[dtype]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,config", [(1, (16, 32, 64, 2)), (5, (16, 32, 128, 1)), (33, (32, 64, 64, 1))])
def test_sp24_dot_kernel(fmt, dtype, m, config):
    w = make_sp24(*fmt)
    if not im.block_k_fits(config[2], w.group, w.bits, sp24=True):
        pytest.skip("tile does not fit the groups")
    x = torch.randn(m, w.in_features, device=DEVICE).to(dtype)
    y = im.dot(x, w, *config)
    assert y.shape == (m, w.out_features) and rel_err(y, reference(x, w)) < REL_TOL[dtype]


def test_module_runs_the_op_and_its_kernels_as_its_reference():
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    keep = nm_mask(w.abs(), 2, 4)
    grid = compute_grid(w * keep, 4, 64, False)
    m = SparseQuantLinear.from_codes(quantize(w, grid), keep, grid, "2:4", 0.5, torch.randn(48), "float16", "l")
    assert m.runs_sp24_op
    x = torch.randn(2, 3, 256)
    want = torch.nn.functional.linear(x, m.dequantized_weight(), m.bias)
    assert torch.allclose(m(x), want, atol=1e-5)  # CPU "auto": the op's reference, the module's own weight
    m = m.to(DEVICE).set_kernel("triton").prepack()
    assert rel_err(m(x.to(DEVICE)) - m.bias, (want - m.bias.cpu()).to(DEVICE)) < REL_TOL[torch.float32]
    with pytest.raises(ValueError, match="2:4 weights of 2, 4 or 8 bits with K and the groups multiples of 32"):
        sp24_int_linear(x[0, :, :48], *m.kernel_layout()[:4], 4, 16, 48, "triton")
