"""The method matrix: every registered method runs on a tiny model, saves, reloads, and gives
identical logits after reload; steps verify their own effect."""

import pytest
import torch

import compress
from compress.errors import CompressError
from compress.registry import methods

X = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(1))
TINY_CALIBRATION = {"samples": 4, "seq_len": 32}
TINY_EVAL = {"windows": 2, "seq_len": 32, "fidelity_windows": 1, "speed": False}

# Per-method step settings that apply to the tiny model (hidden 64, intermediate 96), and the
# largest fraction of the float32 layers' bytes the compressed layers may take.
STEP_SETTINGS = {"rtn": ({"bits": 3, "group_size": 32}, 0.11), "fp8": ({}, 0.27),
                 "gptq": ({"bits": 3, "group_size": 32}, 0.11), "awq": ({"bits": 3, "group_size": 32}, 0.11),
                 "nf4": ({}, 0.21),
                 # pruning keeps float32 values: half of them plus a mask bit per weight (17 of 32 bits),
                 # or N:M positions (2:4: 2 bits, 4:8: 3 bits per kept value)
                 "magnitude": ({"sparsity": 0.5}, 0.54), "wanda": ({"pattern": "2:4"}, 0.54),
                 "sparsegpt": ({"pattern": "4:8"}, 0.55),
                 # low-rank keeps 30% of the targeted parameters (within one rank step per layer),
                 # uniform and surveyed (energy) allocation; or 30% of the whole model, of which the
                 # tied embeddings are 19k of 81k: the targeted layers keep 9%
                 "svd": ({"keep": 0.3, "allocation": "energy"}, 0.3), "asvd": ({"keep": 0.3}, 0.3),
                 "svd_llm": ({"keep": 0.3, "scope": "model"}, 0.1)}


def test_every_method_has_matrix_settings():
    assert set(methods()) == set(STEP_SETTINGS)


@pytest.mark.parametrize("method", sorted(methods()))
def test_method_runs_saves_reloads_identically(method, tiny_dir, tmp_path):
    from compress import checkpoint
    from compress.loading import load_model
    from compress.pipeline import parse
    from compress.runner import compress_model

    settings, max_ratio = STEP_SETTINGS[method]
    step = {"method": method, **settings}
    result = compress.run({"model": str(tiny_dir), "steps": [step], "calibration": TINY_CALIBRATION,
                           "eval": TINY_EVAL, "output": str(tmp_path / "a")})
    report = result.steps[0]
    assert len(report.modules) == 14 and report.bytes_after < report.bytes_before * max_ratio
    assert result.eval.kl > 0 and result.base_eval.kl is None

    model, tokenizer, _ = load_model(str(tiny_dir))
    compress_model(model, tokenizer, parse({"model": "x", "steps": [step], "calibration": TINY_CALIBRATION}))
    checkpoint.save(model, None, tmp_path / "b", {}, False)
    with torch.no_grad():
        expected = model(X).logits
        assert torch.equal(checkpoint.load(tmp_path / "b")(X).logits, expected)
        assert torch.equal(compress.load(tmp_path / "a")(X).logits, expected)  # same pipeline, same model
    with torch.inference_mode():  # loaded there: its buffers keep no version counter for prepack
        assert torch.equal(compress.load(tmp_path / "a")(X).logits, expected)


def test_eval_reports_fidelity_and_more_bits_are_more_faithful(tiny_dir):
    kls = []
    for bits in (8, 3):
        r = compress.run({"model": str(tiny_dir), "steps": [{"method": "rtn", "bits": bits, "group_size": 32}],
                          "eval": TINY_EVAL})
        assert r.eval.scored_tokens == 2 * 31 and 0 <= r.eval.top1 <= 1
        kls.append(r.eval.kl)
    assert kls[0] < kls[1] / 20  # measured 8-bit ~1e-5 vs 3-bit ~1e-3 nats


def test_step_report_measures_error_and_bytes(tiny_dir):
    r = compress.run({"model": str(tiny_dir), "steps": [{"method": "rtn", "bits": 8, "group_size": -1}], "eval": None})
    s = r.steps[0].summary()
    assert s["formats"] == ["int8 per-channel sym"]
    assert 0 < s["max_rel_error"] < 0.01  # 8-bit per-channel on random init: measured ~0.004
    assert s["bits_per_weight"] == pytest.approx(8 + 16 / 64, abs=0.3)


def test_second_step_on_already_quantized_modules_matches_nothing(tiny_dir):
    with pytest.raises(CompressError, match=r"steps\[1\] \(rtn\): every module it targets is already taken"):
        compress.run({"model": str(tiny_dir), "eval": None,
                      "steps": [{"method": "rtn", "group_size": 32, "ignore": []},
                                {"method": "rtn", "group_size": 32, "ignore": []}]})


def test_mixed_precision_by_targets(tiny_dir):
    r = compress.run({"model": str(tiny_dir), "eval": None, "steps": [
        {"method": "rtn", "bits": 8, "group_size": 32, "targets": ["down_proj"]},
        {"method": "rtn", "bits": 4, "group_size": 32},
    ]})
    assert [len(s.modules) for s in r.steps] == [2, 12]
    assert r.steps[0].summary()["formats"] == ["int8 g32 sym"]


def test_input_model_folder_is_not_modified(tiny_dir, tmp_path):
    snapshot = {p.name: p.read_bytes() for p in tiny_dir.iterdir()}
    compress.run({"model": str(tiny_dir), "steps": [{"method": "rtn", "group_size": 32}], "eval": None,
                      "output": str(tmp_path / "o")})
    assert {p.name: p.read_bytes() for p in tiny_dir.iterdir()} == snapshot
