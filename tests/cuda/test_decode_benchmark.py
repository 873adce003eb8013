"""benchmarks/decode.py's served loop (compress.static_decode.StaticDecoder) over the benchmark's
models (dense, int4, 2:4, 2:4 + int4 layers) decodes what `model.generate` decodes: the same
greedy tokens, and a static cache holding what one forward over the decoded sequence computes,
with the whole step traced as one graph (our ops included). On the GPU it runs compiled with CUDA
graphs; here dynamo traces it (fullgraph) and runs it eagerly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import StaticCache

SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
             max_position_embeddings=256)


@pytest.fixture(scope="module")
def decode():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "decode.py"
    spec = importlib.util.spec_from_file_location("decode_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant", ["bf16", "int4", "sp24", "sp24-int4"])
def test_static_decoder_decodes_as_generate(decode, variant):
    torch._dynamo.reset()
    model = decode.build(variant, 2, 32, "cpu", SHAPE, torch.float32)  # "bf16": the dense model, here in fp32
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(1))
    expected = decode.generate(model, ids, 12)
    loop = decode.StaticDecoder(model, 8, 12, dict(backend="eager", fullgraph=True))
    for _ in range(2):  # the second call resets and reuses the cache and the traced step
        out = loop(ids)
        assert out.shape == (1, 20)
        assert torch.equal(out, expected)
    # a model that decodes a constant token would pass trivially
    assert len(set(expected[0, 8:].tolist())) > 2
    # random small weights barely let attention move the argmax, so the tokens alone would not
    # show a token written at the wrong cache position: the cache must hold, at positions 0..18,
    # the keys and values of one forward over the first 19 tokens (the last is never fed back)
    reference = StaticCache(config=model.config, max_cache_len=20)
    with torch.no_grad():
        model(input_ids=out[:, :19], use_cache=True, **{loop.cache_arg: reference})
    for got, want in zip(loop.cache.layers, reference.layers, strict=True):
        for a, b in ((got.keys, want.keys), (got.values, want.values)):  # [1, heads, 20, head_dim]
            torch.testing.assert_close(a[:, :, :19], b[:, :, :19], rtol=1e-4, atol=1e-5)


def test_same_prefix(decode):
    assert decode.same_prefix(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4])) == 2
    assert decode.same_prefix(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3])) == 3
    assert decode.same_prefix(torch.tensor([5, 2]), torch.tensor([1, 2])) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", ["int4", "sp24-int4"])
def test_static_decoder_replays_cuda_graphs(decode, variant):
    """On CUDA with CUDA graphs (the default options): generate's tokens, every graph captured,
    and again on a second call (replays after the cache's reset)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters["inductor"].clear()
    model = decode.build(variant, 2, 128, "cuda", dict(SHAPE, hidden_size=512, intermediate_size=1024), torch.bfloat16)
    torch.manual_seed(0)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 8), device="cuda")
    loop = decode.StaticDecoder(model, 8, 24)
    first, second = loop(ids), loop(ids)
    assert counters["inductor"]["cudagraph_skips"] == 0
    # kernels that split K sum in a varying order, and random logits are close: a late near-tie may
    # flip, a wrong replay (stale cache, overwritten output) changes the tokens from the start
    assert decode.same_prefix(first[0], second[0]) >= 8 + 12
    assert decode.same_prefix(first[0], decode.generate(model, ids, 24)[0]) >= 8 + 12
