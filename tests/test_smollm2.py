"""Integration on the real model (smollm2-135m) with the protocol of ../shared/EVAL.md:
the example pipeline's step and evaluation, at 8 and 4 bits, against one base evaluation.

Bounds come from measurements on the 2-core CPU machine (fp32, wiki, 64 x 512 tokens):
base ppl 22.232 (EVAL.md says 22.23); RTN int8 g64 sym ppl 22.23x, KL 0.0011;
RTN int4 g64 sym ppl 30.99, KL 0.477, top-1 66.1%.
"""

from pathlib import Path

import pytest
import torch

from compress import checkpoint
from compress.evaluate import evaluate
from compress.loading import load_model
from compress.pipeline import load_file
from compress.runner import compress_model

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).parents[1] / "examples" / "smollm2-int4.yaml"


@pytest.fixture(scope="module")
def example():
    return load_file(EXAMPLE, ["eval.speed=false"])


@pytest.fixture(scope="module")
def base(example):
    model, tokenizer, _ = load_model(example.model)
    result, reference = evaluate(model, tokenizer, example.eval, keep_reference=True)
    return model, tokenizer, result, reference


def compress_and_eval(example, base, tmp_path, **changes):
    _, tokenizer, _, reference = base
    copy = load_model(example.model)[0]  # a fresh model: the base stays untouched for the next test
    step = example.steps[0].model_copy(update=changes)
    [report] = compress_model(copy, tokenizer, example.model_copy(update={"steps": [step]}))
    checkpoint.save(copy, tokenizer, tmp_path / "ck", {"steps": []}, False)
    result, _ = evaluate(copy, tokenizer, example.eval, reference=reference)
    return copy, report, result


def test_base_matches_the_protocol(base):
    result = base[2]
    assert result.scored_tokens == 32_704
    assert result.perplexity == pytest.approx(22.23, abs=0.02)


def test_int8_is_nearly_lossless(example, base, tmp_path):
    _, report, result = compress_and_eval(example, base, tmp_path, bits=8)
    assert abs(result.perplexity / base[2].perplexity - 1) < 0.01
    assert result.kl < 0.005 and result.top1 > 0.97
    assert report.bits_per_weight == pytest.approx(8.25)


def test_int4_example_is_worse_than_int8_but_far_from_broken(example, base, tmp_path):
    model, report, result = compress_and_eval(example, base, tmp_path)
    assert report.bits_per_weight == pytest.approx(4.25) and len(report.modules) == 210
    assert 25 < result.perplexity < 36  # measured 30.99
    assert 0.3 < result.kl < 0.65 and result.top1 > 0.6  # measured 0.477, 66.1%
    # the checkpoint is about a quarter of the float layers' size, plus the float embeddings
    assert (tmp_path / "ck" / "model.safetensors").stat().st_size < 0.33 * 538e6
    window = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(checkpoint.load(tmp_path / "ck")(window).logits, model(window).logits)
