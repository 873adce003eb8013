import pytest
import torch
from torch import nn

from tests.compress.test_calibration import run_engine
from compress.calibration import LayerStep
from compress.pipeline import parse
from compress.quant.awq import _absorb
from compress.quant.awq_math import clipped_grid, output_error, search_scales
from compress.quant.quantize import cast_grid, compute_grid, dequantize, quantize
from tests.conftest import tiny_model


def correlated_inputs(n=512, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5
    x[:, :3] *= 20  # a few outlier channels, as in LLM activations
    return x


def test_scale_search_helps_on_outlier_channels_and_never_hurts():
    x = correlated_inputs()
    h = x.T @ x
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    s, a, err, plain = search_scales([w], h, x.abs().mean(0), 3, 16, True, torch.float16)
    assert err <= plain
    assert err < 0.8 * plain and a > 0  # measured 0.65x at a=0.3
    grid = cast_grid(compute_grid(w * s, 3, 16, True), torch.float16)
    q = dequantize(quantize(w * s, grid), grid) / s
    assert output_error(w - q, h).item() == pytest.approx(err, rel=1e-4)


def test_clipped_grid_never_worse_than_minmax_per_layer():
    x = correlated_inputs(d=60, seed=2)
    h = x.T @ x
    w = torch.randn(32, 60, generator=torch.Generator().manual_seed(3))  # 60 = 3 groups of 16 + a short one
    w[0, 5] = 8.0  # an outlier weight that min/max would spend the grid on
    plain = cast_grid(compute_grid(w, 3, 16, False), torch.float16)
    clipped = clipped_grid(w, h, 3, 16, False, torch.float16)
    e_plain = output_error(w - dequantize(quantize(w, plain), plain), h)
    e_clip = output_error(w - dequantize(quantize(w, clipped), clipped), h)
    assert e_clip < 0.7 * e_plain  # measured 0.55x


class Producers:
    """A compressor that records the engine's producer/consumer map and compresses nothing."""

    def observe(self, name, module, x):
        pass

    def prepare_layer(self, model, layer_name, names, producers, consumers):
        self.producers, self.consumers = producers, consumers

    def compress(self, name, module):
        return module


def test_engine_finds_producers_from_the_forward_pass():
    model = tiny_model()
    rec = Producers()
    names = [n for n, m in model.named_modules() if n.startswith("model.layers.1.") and isinstance(m, nn.Linear)]
    step = LayerStep(0, parse({"model": "x", "steps": [{"method": "awq"}]}).steps[0], rec, names)
    run_engine(model, [step], lambda *a: None, torch.randint(0, 320, (2, 12)))
    p = {k.removeprefix("model.layers.1."): v and v.removeprefix("model.layers.1.") for k, v in rec.producers.items()}
    assert p["self_attn.q_proj"] == p["self_attn.k_proj"] == p["self_attn.v_proj"] == "input_layernorm"
    assert p["mlp.gate_proj"] == p["mlp.up_proj"] == "post_attention_layernorm"
    assert p["mlp.down_proj"] is None and p["self_attn.o_proj"] is None
    assert rec.consumers["model.layers.1.input_layernorm"] == {
        f"model.layers.1.self_attn.{n}_proj" for n in "qkv"}


def test_folding_into_a_norm_preserves_the_layer_function():
    model = tiny_model()
    layer = model.model.layers[0]
    x = torch.randn(1, 8, 64)
    with torch.no_grad():
        before = [lin(layer.input_layernorm(x)) for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj)]
        s = torch.rand(64) + 0.5
        assert _absorb(layer.input_layernorm, 1 / s)
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            lin.weight.mul_(s)
        after = [lin(layer.input_layernorm(x)) for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj)]
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_norms_that_do_not_scale_through_their_weight_are_left_alone():
    class OnePlusNorm(nn.Module):  # Gemma-style: x * (1 + weight)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8))

        def forward(self, x):
            return x * (1 + self.weight)

    norm = OnePlusNorm()
    with torch.no_grad():
        assert not _absorb(norm, torch.full((8,), 0.5))
    assert torch.equal(norm.weight, torch.zeros(8))
