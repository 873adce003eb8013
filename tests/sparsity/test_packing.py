import pytest
import torch

from compress.sparsity.masks import nm_mask
from compress.sparsity.packing import compress_nm, decompress_nm, pack_bitmask, to_cutlass, unpack_bitmask


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (5, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nm_roundtrip_is_exact(n, m, dtype):
    w = torch.randn(6, 5 * m).to(dtype)
    keep = nm_mask(w.float().abs(), n, m)
    values, indices = compress_nm(w, keep, n, m)
    assert values.shape == (6, 5 * (m - n)) and values.dtype == dtype and indices.dtype == torch.uint8
    assert torch.equal(decompress_nm(values, indices, n, m, 5 * m), w * keep)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_2_4_layout_is_pytorch_cutlass_layout(dtype):
    """Our values and positions convert to exactly what PyTorch's CUTLASS 2:4 conversion makes of
    the dense pruned weight (values and reordered metadata), so its kernels can run our format."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    torch.manual_seed(0)
    w = torch.randn(64, 96).to(dtype)
    keep = nm_mask(w.float().abs(), 2, 4)
    values, indices = compress_nm(w, keep, 2, 4)
    ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(w * keep)
    ours_values, ours_meta = to_cutlass(values, indices, 96)
    assert torch.equal(ours_values, ref_values)
    assert torch.equal(ours_meta, ref_meta.view(ours_meta.shape))


@pytest.mark.parametrize("cols", [8, 13, 64])
def test_bitmask_roundtrip_is_exact(cols):
    keep = torch.rand(5, cols) > 0.5
    packed = pack_bitmask(keep)
    assert packed.shape == (5, -(-cols // 8)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bitmask(packed, cols), keep)
