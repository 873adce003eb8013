"""LowRankLinear: computes up(down(x)) + bias, rebuilds from its spec, accounts its bytes."""

import pytest
import torch

from compress.errors import CompressError
from compress.lowrank.layers import LowRankLinear


def layer(rank=3, bias=True):
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(10, rank, generator=g), torch.randn(rank, 12, generator=g)
    b = torch.randn(10, generator=g) if bias else None
    return LowRankLinear.from_factors(up, down, b, torch.float32), up, down, b


def test_forward_is_the_product_of_the_factors():
    m, up, down, b = layer()
    x = torch.randn(2, 5, 12)
    assert torch.allclose(m(x), x @ (up @ down).T + b, atol=1e-5)
    assert torch.allclose(m.dequantized_weight(), up @ down, atol=1e-6)
    assert m.num_weights() == 120 and m.storage_bytes() == 3 * (10 + 12) * 4
    assert m.describe() == "rank 3 (55.0% of weights)"


@pytest.mark.parametrize("bias", [True, False])
def test_spec_rebuilds_an_empty_twin(bias):
    m, *_ = layer(bias=bias)
    twin = LowRankLinear.from_spec(m.format_spec(), device="meta")
    assert twin.format_spec() == m.format_spec()
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    twin.load_state_dict(m.state_dict(), assign=True)
    x = torch.randn(3, 12)
    assert torch.equal(twin(x), m(x))


def test_bad_spec_is_a_compress_error():
    with pytest.raises(CompressError, match="rank 13 is outside 1..10"):
        LowRankLinear.from_spec({"in_features": 12, "out_features": 10, "rank": 13, "bias": False})
