"""OWL per-layer ratios: the mean kept, layers with more outlier weights pruned less, a spread of
2 * lambda, exact counts per layer once the ratios are set; refused where it cannot apply."""

import pytest
import torch
from torch import nn

from compress import checkpoint
from compress.sparsity.layers import SparseLinear
from compress.sparsity.owl import layer_of
from compress.sparsity.wanda import WandaConfig
from tests.compress.test_cli import assert_one_line_error, cli


def surveyed(weights: dict[str, torch.Tensor], ratio: float = 0.5, spread: float = 0.08) -> dict[str, float]:
    """The plan of a Wanda OWL step over modules with these weights and unit input norms."""
    compressor = WandaConfig(allocation="owl", sparsity=ratio, owl_lambda=spread).build()
    modules = {}
    for name, w in weights.items():
        modules[name] = nn.Linear(w.shape[1], w.shape[0], bias=False)
        modules[name].weight.data.copy_(w)
        compressor.observe(name, modules[name], torch.ones(1, 1, w.shape[1]))
        compressor.survey(name, modules[name])
    return compressor.allocate(modules, 0)


def test_layers_with_more_outliers_are_pruned_less_and_the_mean_is_kept():
    torch.manual_seed(0)
    calm = torch.randn(64, 64).clamp(-2, 2)
    spiky = calm.clone()
    spiky.view(-1)[:200] *= 40  # 5% outliers far above 5x the mean score
    plan = surveyed({"model.layers.0.q": calm, "model.layers.0.k": calm, "model.layers.1.q": spiky,
                     "model.layers.1.k": spiky, "model.layers.2.q": calm, "model.layers.2.k": spiky})
    assert plan["model.layers.0.q"] == plan["model.layers.0.k"]  # one ratio per decoder layer
    assert plan["model.layers.1.q"] < plan["model.layers.2.q"] < plan["model.layers.0.q"]
    assert plan["model.layers.0.q"] - plan["model.layers.1.q"] == pytest.approx(0.16)  # 2 * lambda
    assert sum(plan.values()) / len(plan) == pytest.approx(0.5)  # equal sizes: the plain mean


def test_unequal_layers_keep_the_parameter_weighted_mean():
    torch.manual_seed(0)
    small, big = torch.randn(16, 64), torch.randn(256, 64)
    big.view(-1)[:300] *= 40
    plan = surveyed({"m.layers.0.a": small, "m.layers.1.a": big}, ratio=0.4)
    mean = (plan["m.layers.0.a"] * small.numel() + plan["m.layers.1.a"] * big.numel()) / (small.numel() + big.numel())
    assert mean == pytest.approx(0.4) and plan["m.layers.1.a"] < plan["m.layers.0.a"]


def test_layer_of_finds_the_decoder_layer():
    assert layer_of("model.layers.12.self_attn.q_proj") == "model.layers.12"
    assert layer_of("lm_head") == "lm_head"


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_pipeline_with_owl_varies_ratios_per_layer_and_keeps_the_mean(tiny_dir, tmp_path, method):
    import compress

    out = tmp_path / "owl"
    compress.run({"model": str(tiny_dir), "calibration": {"samples": 4, "seq_len": 32}, "eval": None,
                  "steps": [{"method": method, "allocation": "owl", "sparsity": 0.5}], "output": str(out)})
    model = checkpoint.load(out)
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            layers.setdefault(layer_of(name), []).append((m.nnz, m.num_weights()))
    ratios = [1 - sum(k for k, _ in mods) / sum(n for _, n in mods) for mods in layers.values()]
    assert len(ratios) == 2 and abs(ratios[0] - ratios[1]) > 0.1  # the tiny model's 2 layers: 0.42 / 0.58
    pruned = sum(n - k for mods in layers.values() for k, n in mods)
    assert pruned / sum(n for mods in layers.values() for _, n in mods) == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("args,pattern", [
    (["--method", "wanda", "--pattern", "2:4"], r"allocation owl sets unstructured per-layer ratios; pattern 2:4"),
    (["--method", "magnitude"], r"allocation owl scores weights by calibration activations; magnitude uses none"),
])
def test_owl_where_it_cannot_apply_is_one_line(tiny_dir, tmp_path, args, pattern):
    out = tmp_path / "o"
    assert_one_line_error(cli("prune", tiny_dir, "-o", out, "--allocation", "owl", *args, "--quiet"), pattern)
    assert not out.exists()
