"""SparseGPT against Wanda and magnitude on one layer with correlated inputs: the layer's output
error ||X W^T - X W'^T|| on the calibration inputs."""

import pytest
import torch
from torch import nn

from compress.sparsity.magnitude import MagnitudeConfig
from compress.sparsity.sparsegpt_math import sparsegpt_prune
from compress.sparsity.sparsegpt import SparseGPTConfig
from compress.sparsity.wanda import WandaConfig


def layer_errors(pattern):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    lin = nn.Linear(128, 48, bias=False)
    # strongly correlated features (32 latent factors plus noise), with unequal scales as LLM
    # activations have: the pruned weights' contribution can largely be moved onto kept ones
    latent = torch.randn(8, 64, 32, generator=g) @ torch.randn(32, 128, generator=g)
    x = (latent + 0.1 * torch.randn(8, 64, 128, generator=g)) * torch.rand(128, generator=g).add(0.5)
    errors = {}
    for config in (MagnitudeConfig(pattern=pattern), WandaConfig(pattern=pattern), SparseGPTConfig(pattern=pattern)):
        compressor = config.build()
        if hasattr(compressor, "observe"):
            for batch in x.split(2):
                compressor.observe("l", lin, batch)
        pruned = compressor.compress("l", lin)
        with torch.no_grad():
            errors[config.method] = ((lin(x) - pruned(x)).norm() / lin(x).norm()).item()
    return errors


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_wanda_beats_magnitude_on_correlated_inputs(pattern):
    e = layer_errors(pattern)
    # measured (unstructured / 2:4): magnitude 0.365 / 0.447, wanda 0.314 / 0.395, sparsegpt 0.129 / 0.177
    assert e["sparsegpt"] < 0.6 * e["wanda"] and e["wanda"] < 0.95 * e["magnitude"], e


def test_row_scope_prunes_every_row_alike_and_block_scope_the_layer_exactly():
    torch.manual_seed(0)
    w = torch.randn(12, 64)
    x = torch.randn(256, 64) @ torch.randn(64, 64)
    h = 2 * x.T @ x / 256
    keep_row = sparsegpt_prune(w, h, 0.3, None, block_size=16, per_row=True).keep
    assert set((64 - keep_row.sum(dim=1)).tolist()) <= {19, 20}  # 0.3 * 64 = 19.2 per row
    keep_block = sparsegpt_prune(w, h, 0.3, None, block_size=16).keep
    assert 12 * 64 - int(keep_block.sum()) == round(0.3 * 12 * 64)
