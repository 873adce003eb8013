"""SparseGPT with joint quantization: the column loop's math (sparsegpt_math.py) and the
SparseQuantLinear storage of kept codes plus positions."""

import pytest
import torch
from torch import nn

from compress.errors import CompressError
from compress.quant.quantize import compute_grid, dequantize, quantize
from compress.sparsity.masks import check_mask, nm_mask, unstructured_mask
from compress.sparsity.sparse_quant import SparseQuantLinear
from compress.sparsity.sparsegpt import SparseGPTConfig
from compress.sparsity.sparsegpt_math import GridSpec, sparsegpt_prune

GRID4 = GridSpec(bits=4, group_size=64, symmetric=True, clip=True, scale_dtype=torch.float16)


def correlated_hessian(seed: int, n: int = 256) -> torch.Tensor:
    """H = 2/N X^T X of inputs with 32 latent factors and unequal feature scales, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 32, generator=g) @ torch.randn(32, n, generator=g)
    x = (x + 0.1 * torch.randn(2048, n, generator=g)) * torch.rand(n, generator=g).add(0.5)
    return 2 * x.T @ x / 2048


def relative_loss(w: torch.Tensor, w_new: torch.Tensor, h: torch.Tensor) -> float:
    """The layer's squared output error on the calibration inputs, relative to its output."""
    d = w - w_new
    return ((d @ h * d).sum() / (w @ h * w).sum()).item()


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_joint_result_is_the_stored_grid_with_the_exact_pattern(nm):
    h = correlated_hessian(0)
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(1))
    r = sparsegpt_prune(w, h, 0.5, nm, per_row=True, grid=GRID4)
    check_mask(r.keep, "unstructured" if nm is None else "2:4", 0.5, "l")
    assert torch.equal(r.weight, dequantize(r.codes, r.grid) * r.keep)  # on the grid where kept, exactly 0 elsewhere
    assert torch.equal(r.grid.scales, r.grid.scales.half().float())  # scales representable in their storage dtype


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_a_second_pass_with_the_mask_fixed_equals_one_pass_with_that_mask(nm):
    # OBS updates are linear: pruning, then quantizing with the mask held, is the same sequence of
    # column steps as doing both at once with that mask (measured: equal to 4 decimals)
    h, w = correlated_hessian(2), torch.randn(32, 256, generator=torch.Generator().manual_seed(3))
    pruned = sparsegpt_prune(w, h, 0.5, nm, per_row=True)
    two = sparsegpt_prune(pruned.weight, h, 0.5, nm, per_row=True, grid=GRID4, keep=pruned.keep)
    one = sparsegpt_prune(w, h, 0.5, nm, per_row=True, grid=GRID4, keep=pruned.keep)
    assert torch.equal(two.keep, pruned.keep) and torch.equal(one.keep, pruned.keep)
    assert relative_loss(w, one.weight, h) == pytest.approx(relative_loss(w, two.weight, h), rel=0.02)


@pytest.mark.parametrize("nm", [(2, 4), None])
def test_joint_against_prune_then_quantize(nm):
    # 2:4: joint below two passes; unstructured: no worse than 5% on average. Measured joint /
    # separate loss, seeds 0-2: 2:4 0.904, 0.965, 0.943; unstructured 1.087, 0.982,
    # 0.964 (the unstructured mask is chosen per block either way, so joint gains little there).
    # With each group's grid taken from its current values, as the reference does, the unstructured
    # mean was 1.17 and 2:4 came out no better than separate: the look-ahead in _group_grid is what
    # this guards.
    ratios = []
    for seed in range(3):
        h, w = correlated_hessian(seed), torch.randn(96, 256, generator=torch.Generator().manual_seed(seed))
        pruned = sparsegpt_prune(w, h, 0.5, nm, per_row=True)
        separate = sparsegpt_prune(pruned.weight, h, 0.5, nm, per_row=True, grid=GRID4, keep=pruned.keep)
        joint = sparsegpt_prune(w, h, 0.5, nm, per_row=True, grid=GRID4)
        ratios.append(relative_loss(w, joint.weight, h) / relative_loss(w, separate.weight, h))
        # and quantizing costs something over pruning alone
        assert relative_loss(w, joint.weight, h) > relative_loss(w, pruned.weight, h)
    if nm is not None:
        assert max(ratios) < 0.98, ratios
    else:
        assert sum(ratios) / 3 < 1.05, ratios


def stored(pattern: str, bits: int = 4, group_size: int = 128, symmetric: bool = True, shape=(32, 256)):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    keep = unstructured_mask(w.abs(), 0.5, False) if pattern == "unstructured" else nm_mask(
        w.abs(), *map(int, pattern.split(":")))
    grid = compute_grid(w * keep, bits, group_size, symmetric)
    codes = quantize(w, grid)
    b = torch.randn(shape[0])
    return codes, keep, grid, b, SparseQuantLinear.from_codes(codes, keep, grid, pattern, 0.5, b, "float32", "l")


@pytest.mark.parametrize("pattern,symmetric,bits", [("2:4", True, 4), ("4:8", False, 3), ("unstructured", True, 4),
                                                    ("unstructured", False, 2)])
def test_stores_exactly_the_kept_codes_and_reloads(pattern, symmetric, bits):
    codes, keep, grid, b, m = stored(pattern, bits, 64, symmetric)
    want = dequantize(codes, grid) * keep
    assert torch.equal(m.dequantized_weight(), want)
    x = torch.randn(3, 256)
    ref = nn.functional.linear(x, want, b)
    if pattern == "2:4":  # its op: on CPU the fused matmul (cuda/cpu_fused.py), the same sums in another order
        assert (m(x) - ref).norm() < 1e-6 * ref.norm()
        m.set_kernel("reference")
    assert torch.equal(m(x), ref)
    assert m.sparsity() == 0.5 and m.storage == ("bitmask" if pattern == "unstructured" else "nm")
    empty = SparseQuantLinear.from_spec(m.format_spec(), device="meta")
    empty.load_state_dict(m.state_dict(), assign=True)
    assert torch.equal(empty.dequantized_weight(), want) and empty.describe() == m.describe()


def test_2of4_4bit_takes_a_fifth_of_the_bf16_bytes():
    # kept codes 4 bits + positions 2 bits per kept weight, one float16 scale per 128 columns:
    # (4 + 2) / 2 + 16 / 128 = 3.125 bits per weight
    m = SparseQuantLinear.from_codes(*stored("2:4")[:3], "2:4", 0.5, None, "float16", "l")
    assert m.storage_bytes() / (32 * 256 * 2) == pytest.approx(3.125 / 16)
    assert m.describe() == "2:4 sparse (50.0%) + int4 g128 sym"
    # unstructured: a bit per weight plus the kept codes
    m = SparseQuantLinear.from_codes(*stored("unstructured")[:3], "unstructured", 0.5, None, "float16", "l")
    assert m.storage_bytes() / (32 * 256 * 2) == pytest.approx((1 + 2 + 0.125) / 16)


def test_a_mask_off_the_pattern_is_refused_with_the_layer_name():
    codes, keep, grid, *_ = stored("2:4")
    keep[0, :4] = True
    with pytest.raises(CompressError, match="model.layers.0.mlp.up_proj: 1 groups of 4 do not keep exactly 2"):
        SparseQuantLinear.from_codes(codes, keep, grid, "2:4", 0.5, None, "float16", "model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("fields,message", [
    ({"quantize": {"bits": 4, "group_size": 96}}, "group_size 96 and block_size 128: one must divide the other"),
    ({"pattern": "4:8", "quantize": {"bits": 4, "group_size": 4}},
     r"quantize.group_size\n.*must be -1 \(per-channel\) or at least 8"),
    ({"pattern": "2:4", "block_size": 16, "quantize": {"bits": 4, "group_size": 8, "clip": False}}, None),
    ({"pattern": "4:8", "block_size": 24, "quantize": {"bits": 4, "group_size": 12}}, "multiple of the pattern's"),
    ({"quantize": {"bits": 9}}, "less than or equal to 8"),
])
def test_config_refuses_grids_the_loop_cannot_keep_up_to_date(fields, message):
    if message is None:
        assert SparseGPTConfig(**fields).quantize.group_size == 8
        return
    with pytest.raises(ValueError, match=message):
        SparseGPTConfig(**fields)


def test_compressor_stores_joint_and_separate_results():
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    x = torch.randn(4, 128, 256) @ torch.randn(256, 256) * 0.1
    out = {}
    for joint in (True, False):
        c = SparseGPTConfig(pattern="2:4", quantize={"bits": 4, "group_size": 64, "joint": joint}).build()
        c.observe("l", lin, x)
        m = c.compress("l", lin)
        assert isinstance(m, SparseQuantLinear) and m.bias is not None and m.sparsity() == 0.5
        with torch.no_grad():
            out[joint] = ((m(x) - lin(x)).norm() / lin(x).norm()).item()
    assert 0 < out[True] < 0.5 and 0 < out[False] < 0.5, out
