"""Integration on the real model (smollm2-135m) with the protocol of ../shared/EVAL.md:
the example pipeline's step and evaluation at 8, 4 and 3 bits, GPTQ against it at 4 and 3
bits, the three pruning methods at 2:4 (and SparseGPT 2:4 with joint 4-bit) and the three
low-rank decompositions at 20% of the weights removed, all against one base evaluation.

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
from compress.pipeline import load_file, parse_step
from compress.runner import compress_model

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).parents[1] / "examples" / "smollm2-int4.yaml"
# GPTQ vs RTN (g64 sym), measured KL 0.208 vs 0.477 at 4 bits, 0.791 vs 2.145 at 3 bits;
# top-1 77.4% vs 66.1%, 59.3% vs 31.6%.
KL_RATIO = {4: 0.6, 3: 0.5}
TOP1_GAIN = {4: 0.06, 3: 0.15}
# 2:4 pruning, measured KL (64 calibration samples; the test uses 32): magnitude 4.38, Wanda 2.27,
# SparseGPT 1.74. Bounds: each method's KL below this fraction of the next weaker one's.
KL_2_4 = {"sparsegpt": 0.9, "wanda": 0.65}
# SparseGPT 2:4 with its kept weights jointly quantized to 4 bits, group 128: measured KL 1.946 (64
# samples) against 1.744 for 2:4 alone, in 3.135 bits per weight. Bound: below this multiple of 2:4's.
KL_JOINT_4BIT = 1.25
# Low-rank keeping 80% of the Linear weights, uniform ranks, 64 calibration samples (the README
# table's rows), measured KL: svd 14.00, asvd 10.64, svd_llm 2.065. Bounds: each method's KL
# below this fraction of the next weaker one's.
KL_LOWRANK = {"svd_llm": 0.5, "asvd": 0.9}


@pytest.fixture(scope="module")
def example():
    return load_file(EXAMPLE, ["eval.speed=false"])


@pytest.fixture(scope="module")
def base(example):
    model, tokenizer, _ = load_model(example.model)
    result, reference = evaluate(model, tokenizer, example.eval, keep_reference=True)
    return model, tokenizer, result, reference


def compress_and_eval(example, base, folder, **changes):
    """(model, step report, eval result, checkpoint folder) of the example's step with `changes`."""
    _, tokenizer, _, reference = base
    copy = load_model(example.model)[0]  # a fresh model: the base stays untouched for the next test
    grid = example.steps[0].model_dump(include={"bits", "group_size", "symmetric", "targets", "ignore"})
    step = parse_step({"method": "rtn", **grid, **changes}, "test step")  # other methods at their defaults
    [report] = compress_model(copy, tokenizer, example.model_copy(update={"steps": [step]}))
    checkpoint.save(copy, tokenizer, folder / "ck", {"steps": []}, False)
    result, _ = evaluate(copy, tokenizer, example.eval, reference=reference)
    return copy, report, result, folder / "ck"


@pytest.fixture(scope="module")
def rtn(example, base, tmp_path_factory):
    """RTN g64 sym at 3 and 4 bits, each compressed and evaluated once for the tests that compare with it."""
    return {bits: compress_and_eval(example, base, tmp_path_factory.mktemp(f"rtn{bits}"), bits=bits)
            for bits in (3, 4)}


def test_base_matches_the_protocol(base):
    result = base[2]
    assert result.scored_tokens == 32_704
    assert result.perplexity == pytest.approx(22.23, abs=0.02)


def test_int8_is_nearly_lossless(example, base, tmp_path):
    _, report, result, _ = compress_and_eval(example, base, tmp_path, bits=8)
    assert abs(result.perplexity / base[2].perplexity - 1) < 0.01
    assert result.kl < 0.005 and result.top1 > 0.97
    assert report.bits_per_weight == pytest.approx(8.25)


def test_int4_example_is_worse_than_int8_but_far_from_broken(rtn):
    model, report, result, ck = rtn[4]
    assert report.bits_per_weight == pytest.approx(4.25) and len(report.modules) == 210
    assert 25 < result.perplexity < 36  # measured 30.99
    assert 0.3 < result.kl < 0.65 and result.top1 > 0.6  # measured 0.477, 66.1%
    # the checkpoint is about a quarter of the float layers' size, plus the float embeddings
    assert (ck / "model.safetensors").stat().st_size < 0.33 * 538e6
    window = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(checkpoint.load(ck)(window).logits, model(window).logits)


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_is_more_faithful_than_rtn(example, base, rtn, tmp_path, bits):
    """GPTQ (64 x 512 news tokens, actorder) against RTN at the same format: KL first, then top-1 and ppl."""
    _, report, result, _ = compress_and_eval(example, base, tmp_path, method="gptq", bits=bits)
    _, rtn_report, rtn_result, _ = rtn[bits]
    assert report.bits_per_weight == rtn_report.bits_per_weight
    assert result.kl < KL_RATIO[bits] * rtn_result.kl
    assert result.top1 > rtn_result.top1 + TOP1_GAIN[bits]
    assert result.perplexity < rtn_result.perplexity


@pytest.fixture(scope="module")
def fidelity(example):
    """The example's evaluation on its 8 fidelity windows only: KL and top-1 as the full one gives
    them, for tests that read no perplexity (the 64 windows cost 80 s a model)."""
    return example.eval.model_copy(update={"windows": example.eval.fidelity_windows})


@pytest.fixture(scope="module")
def pruned_2_4(example, base, fidelity):
    """Each pruning method at 2:4 (calibrated ones on 32 x 512 news tokens), KL and top-1 on the
    8 fidelity windows only."""
    _, tokenizer, _, reference = base
    out = {}
    joint = {"method": "sparsegpt", "quantize": {"bits": 4, "group_size": 128}}
    for label, step in [(m, {"method": m}) for m in ("magnitude", "wanda", "sparsegpt")] + [("joint", joint)]:
        model = load_model(example.model)[0]
        pipeline = example.model_copy(update={"steps": [parse_step({**step, "pattern": "2:4"}, "test")],
                                              "calibration": example.calibration.model_copy(update={"samples": 32})})
        [report] = compress_model(model, tokenizer, pipeline)
        result, _ = evaluate(model, tokenizer, fidelity, reference=reference)
        out[label] = (report, result)
        del model
    return out


def test_2_4_pruning_orders_as_the_literature(pruned_2_4):
    """SparseGPT <= Wanda << magnitude at 2:4, KL first; every layer verified 2:4 (50% of weights)."""
    kl = {method: result.kl for method, (_, result) in pruned_2_4.items()}
    for method in ("magnitude", "wanda", "sparsegpt"):
        report = pruned_2_4[method][0]
        assert len(report.modules) == 210 and {m.after for m in report.modules} == {"2:4 sparse (50.0%)"}
    assert kl["sparsegpt"] < KL_2_4["sparsegpt"] * kl["wanda"], kl
    assert kl["wanda"] < KL_2_4["wanda"] * kl["magnitude"], kl


def test_2_4_with_joint_4bit_costs_little_over_2_4_alone(pruned_2_4):
    """SparseGPT 2:4 + 4-bit in one pass: every layer 2:4 with 4-bit kept codes, about a fifth of
    the bits of bf16 weights, for a small loss over 2:4 alone."""
    report, result = pruned_2_4["joint"]
    assert len(report.modules) == 210 and {m.after for m in report.modules} == {"2:4 sparse (50.0%) + int4 g128 sym"}
    assert report.bits_per_weight < 3.2
    kl = pruned_2_4["sparsegpt"][1].kl
    assert kl < result.kl < KL_JOINT_4BIT * kl, (result.kl, kl)


@pytest.fixture(scope="module")
def lowrank_20(example, base, fidelity):
    """Each decomposition keeping 80% of the Linear weights (uniform ranks; calibrated ones on
    the example's 64 x 512 news tokens), KL and top-1 on the 8 fidelity windows only."""
    _, tokenizer, _, reference = base
    out = {}
    for method in ("svd", "asvd", "svd_llm"):
        model = load_model(example.model)[0]
        pipeline = example.model_copy(update={"steps": [parse_step({"method": method, "keep": 0.8}, "test")]})
        [report] = compress_model(model, tokenizer, pipeline)
        result, _ = evaluate(model, tokenizer, fidelity, reference=reference)
        out[method] = (report, result)
        del model
    return out


def test_low_rank_orders_as_the_literature(lowrank_20):
    """Whitened < activation-aware << plain SVD at 20% of the weights removed, KL first; every
    layer factored at 80% of its weights (within one rank step)."""
    kl = {method: result.kl for method, (_, result) in lowrank_20.items()}
    for report, _ in lowrank_20.values():
        assert len(report.modules) == 210
        assert 0.79 < report.bytes_after / report.bytes_before <= 0.8
    assert kl["svd_llm"] < KL_LOWRANK["svd_llm"] * kl["asvd"], kl
    assert kl["asvd"] < KL_LOWRANK["asvd"] * kl["svd"], kl
