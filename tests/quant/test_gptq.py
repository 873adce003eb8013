import pytest
import torch
from torch import nn

from compress.quant.gptq import GPTQConfig


def test_modules_fed_the_same_tensor_share_one_hessian_with_identical_results():
    torch.manual_seed(0)
    q, k, o = nn.Linear(32, 16), nn.Linear(32, 8), nn.Linear(32, 16)
    shared, separate = GPTQConfig(group_size=16).build(), GPTQConfig(group_size=16).build()
    for _ in range(3):  # three samples, each a fresh tensor fed to q and k, then another to o
        x, y = torch.randn(1, 10, 32), torch.randn(1, 10, 32)
        shared.observe("q", q, x), shared.observe("k", k, x), shared.observe("o", o, y)
        separate.observe("q", q, x.clone()), separate.observe("k", k, x.clone()), separate.observe("o", o, y)
    assert shared.hessians.key_of == {"q": "q", "k": "q", "o": "o"} and set(shared.hessians.hessians) == {"q", "o"}
    assert set(separate.hessians.hessians) == {"q", "k", "o"}
    for name, module in (("q", q), ("k", k), ("o", o)):
        a, b = shared.compress(name, module), separate.compress(name, module)
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
    assert shared.hessians.hessians == {} and shared.hessians.key_of == {}  # each freed with its last module


def test_a_module_that_saw_no_inputs_is_named():
    from compress.errors import CompressError

    with pytest.raises(CompressError, match="gptq: q saw no calibration inputs"):
        GPTQConfig(group_size=16).build().compress("q", nn.Linear(32, 16))
