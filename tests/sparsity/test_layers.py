import pytest
import torch
from torch import nn

from compress.errors import CompressError
from compress.sparsity.layers import SparseLinear
from compress.sparsity.masks import nm_mask, unstructured_mask


def pruned(pattern, ratio, dtype=torch.float32, shape=(16, 64), bias=True):
    torch.manual_seed(0)
    w = torch.randn(*shape).to(dtype)
    keep = unstructured_mask(w.float().abs(), ratio, False) if pattern == "unstructured" else nm_mask(
        w.float().abs(), *map(int, pattern.split(":")))
    b = torch.randn(shape[0]) if bias else None
    return w, keep, b, SparseLinear.from_pruned(w, keep, pattern, ratio, b, "l")


@pytest.mark.parametrize("pattern,ratio,storage", [("2:4", 0.5, "nm"), ("4:8", 0.5, "nm"),
                                                   ("unstructured", 0.5, "bitmask"), ("unstructured", 0.03, "dense")])
def test_stores_exactly_the_pruned_weight(pattern, ratio, storage):
    w, keep, b, m = pruned(pattern, ratio)
    assert m.storage == storage
    assert torch.equal(m.dequantized_weight(), w * keep)
    x = torch.randn(3, 64)
    ref = nn.functional.linear(x, w * keep, b)
    if m.runs_sp24_op:  # "auto" on CPU: the fused kernel (cuda/cpu_fused.py), the same sums in another order
        assert ((m(x) - ref).norm() / ref.norm()).item() < 1e-6
        m.set_kernel("reference")
    assert torch.equal(m(x), ref)
    assert m.sparsity() == pytest.approx(ratio, abs=1 / 1024)


def test_bytes_are_really_smaller():
    # 2:4 in bf16: half the values plus 2 bits of position per kept value = 56.25% of dense
    _, _, _, m = pruned("2:4", 0.5, torch.bfloat16)
    assert m.storage_bytes() / (16 * 64 * 2) == pytest.approx(0.5625)
    _, _, _, m = pruned("4:8", 0.5, torch.bfloat16)  # 3-bit positions
    assert m.storage_bytes() / (16 * 64 * 2) == pytest.approx(0.59375)
    # unstructured 50% in bf16: a bit per weight plus the kept values
    _, _, _, m = pruned("unstructured", 0.5, torch.bfloat16)
    assert m.storage_bytes() / (16 * 64 * 2) == pytest.approx(0.5 + 1 / 16)


@pytest.mark.parametrize("pattern,ratio", [("2:4", 0.5), ("unstructured", 0.5), ("unstructured", 0.03)])
def test_reloads_from_spec_and_state_dict(pattern, ratio):
    _, _, _, m = pruned(pattern, ratio)
    empty = SparseLinear.from_spec(m.format_spec(), device="meta")
    empty.load_state_dict(m.state_dict(), assign=True)
    assert torch.equal(empty.dequantized_weight(), m.dequantized_weight())
    assert empty.describe() == m.describe()


def test_a_mask_off_the_pattern_is_refused_with_the_layer_name():
    w = torch.randn(4, 8)
    keep = torch.ones(4, 8, dtype=torch.bool)
    with pytest.raises(CompressError, match="model.layers.0.q_proj: .* do not keep exactly 2"):
        SparseLinear.from_pruned(w, keep, "2:4", 0.5, None, "model.layers.0.q_proj")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prepacked_2of4_runs_the_fastest_of_our_kernels_and_pytorch_sparse_ones():
    """A 2:4 layer prepared for bf16 on CUDA computes what the reference computes at decode and
    prefill sizes, through whichever of our kernels, decompress + cuBLAS and cuSPARSELt is
    fastest (chosen by the tuner: not the reference path); none of them disagrees with the
    reference; fp32 activations keep the stored fp32 values; new weights drop the prepared layout."""
    from compress.cuda import cusparselt
    from compress.cuda.int_matmul import TUNER, sp24_values, tuner_key

    torch.manual_seed(0)
    w = torch.randn(512, 1024)
    layer = SparseLinear.from_pruned(w, nm_mask(w.abs(), 2, 4), "2:4", None, torch.randn(512), "l").cuda()
    layer.prepack(torch.bfloat16)
    assert layer._prepacked is not None and layer._prepacked[0].dtype == torch.bfloat16
    assert (layer._prepacked[2] is not None) == cusparselt.applies(512, 1024, torch.bfloat16, w.cuda().device)
    for m in (1, 16, 300):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ layer.dequantized_weight().T + layer.bias
        y = layer(x)
        assert y.dtype == torch.bfloat16 and ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
        assert tuner_key(x, sp24_values(*layer._prepacked)) in TUNER.choices()
    assert not any(TUNER.rejected.values()), TUNER.rejected
    x = torch.randn(3, 1024, device="cuda")
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias), atol=1e-4)
    layer.load_state_dict(layer.state_dict())
    assert layer._prepacked is None
