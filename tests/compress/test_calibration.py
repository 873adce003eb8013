import pytest
import torch
from torch import nn

import compress
from compress.activations import LayerCall, MemoryActivations, batches, merge_calls
from compress.calibration import InMemoryLayers, check_inside_layers, LayerStep, capture_inputs, compress_layers, find_layers
from compress.errors import CompressError
from compress.pipeline import parse
from tests.conftest import tiny_model

SAMPLES = torch.randint(0, 320, (3, 20), generator=torch.Generator().manual_seed(0))


class Recorder:
    """Observes like a calibrated method and compresses by copying (so outputs are unchanged)."""

    def __init__(self):
        self.seen: dict[str, list[torch.Tensor]] = {}

    def observe(self, name, module, x):
        self.seen.setdefault(name, []).append(x.clone())

    def compress(self, name, module):
        new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        new.load_state_dict(module.state_dict())
        return new


def run_engine(model, steps, on_compressed, samples=SAMPLES, batch_size=1):
    cpu = torch.device("cpu")
    layers = find_layers(model)
    calls = capture_inputs(model, layers[0][1], samples, cpu, MemoryActivations())
    return compress_layers(model, layers, steps, InMemoryLayers(cpu, cpu), cpu, on_compressed, calls,
                           batch_size=batch_size)


def test_find_layers_from_no_split_modules_and_fallback():
    model = tiny_model()
    assert [n for n, _ in find_layers(model)] == ["model.layers.0", "model.layers.1"]
    model._no_split_modules = None
    assert [n for n, _ in find_layers(model)] == ["model.layers.0", "model.layers.1"]  # longest ModuleList
    assert [n for n, _ in find_layers(model, r"re:model\.layers\.\d+")] == ["model.layers.0", "model.layers.1"]


def test_undiscoverable_layers_name_what_was_looked_for():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(CompressError, match=r"cannot find the decoder layers of Sequential: .*calibration.layers"):
        find_layers(model)


def test_capture_keeps_every_keyword_argument():
    model = tiny_model()
    calls = list(capture_inputs(model, model.model.layers[0], SAMPLES, torch.device("cpu"), MemoryActivations()))
    assert len(calls) == 3
    assert calls[0].hidden.shape == (1, 20, 64)
    assert "position_embeddings" in calls[0].kwargs  # rotary cos/sin computed by the model, not by us


@pytest.mark.parametrize("batch_size", [1, 2])
def test_observers_see_what_the_full_model_feeds_each_module(batch_size):
    model = tiny_model()
    name = "model.layers.1.mlp.down_proj"
    expected = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: expected.append(i[0].clone()))
    with torch.no_grad():
        for s in SAMPLES:
            model(s[None])
    handle.remove()
    rec = Recorder()
    step = LayerStep(0, parse({"model": "x", "steps": [{"method": "gptq"}]}).steps[0], rec,
                          [name, "model.layers.0.self_attn.q_proj"])
    swapped = []
    run_engine(model, [step], lambda s, n, old, new: swapped.append(n), batch_size=batch_size)
    assert swapped == ["model.layers.0.self_attn.q_proj", name]  # layer by layer, in order
    assert [x.shape[0] for x in rec.seen[name]] == ([1, 1, 1] if batch_size == 1 else [2, 1])  # samples per call
    torch.testing.assert_close(torch.cat(rec.seen[name]), torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_targets_outside_layers_are_refused():
    model = tiny_model()
    step = LayerStep(0, parse({"model": "x", "steps": [{"method": "gptq"}]}).steps[0], Recorder(), ["lm_head"])
    with pytest.raises(CompressError, match="lm_head is outside the decoder layers"):
        check_inside_layers([step], [n for n, _ in find_layers(model)])


def test_gptq_beats_rtn_on_layer_outputs_of_the_tiny_model(tiny_dir):
    """End to end through the engine: 3-bit GPTQ is more faithful than 3-bit RTN."""
    ev = {"windows": 2, "seq_len": 64, "fidelity_windows": 2, "speed": False}
    kl = {}
    for method in ("rtn", "gptq"):
        r = compress.run({"model": str(tiny_dir), "calibration": {"samples": 8, "seq_len": 64}, "eval": ev,
                          "steps": [{"method": method, "bits": 3, "group_size": 32}]})
        kl[method] = r.eval.kl
    assert kl["gptq"] < 0.8 * kl["rtn"]


@pytest.mark.parametrize("calibration, pattern", [
    ({"samples": 4, "seq_len": 512}, r"calibration.seq_len 512 is above the model's limit of 256"),
    ({"samples": 100000, "seq_len": 200}, r"calibration data 'news': the text has \d+ tokens, enough for \d+ windows"),
    ({"samples": 2, "seq_len": 16, "layers": "Conv2d"}, r"calibration.layers 'Conv2d' matches no module"),
])
def test_bad_calibration_settings(tiny_dir, calibration, pattern):
    with pytest.raises(CompressError, match=pattern):
        compress.run({"model": str(tiny_dir), "calibration": calibration, "eval": None,
                      "steps": [{"method": "gptq", "group_size": 32}]})


def test_mixed_precision_in_one_calibrated_pass(tiny_dir):
    r = compress.run({"model": str(tiny_dir), "calibration": {"samples": 2, "seq_len": 16}, "eval": None, "steps": [
        {"method": "gptq", "bits": 8, "group_size": 32, "targets": ["down_proj"]},
        {"method": "gptq", "bits": 4, "group_size": 32},
    ]})
    assert [len(s.modules) for s in r.steps] == [2, 12]
    assert [s.summary()["formats"] for s in r.steps] == [["int8 g32 sym"], ["int4 g32 sym"]]


def test_merged_calls_share_equal_arguments_and_stack_the_rest():
    a = LayerCall((torch.ones(1, 3, 4),), {"pos": (torch.zeros(1, 3, 2),), "mask": torch.ones(1, 3), "flag": False})
    b = LayerCall((torch.zeros(1, 3, 4),), {"pos": (torch.zeros(1, 3, 2),), "mask": torch.zeros(1, 3), "flag": False})
    merged = merge_calls([a, b])
    assert merged.hidden.shape == (2, 3, 4) and merged.kwargs["pos"][0].shape == (1, 3, 2)  # shared, broadcasts
    assert merged.kwargs["mask"].shape == (2, 3) and merged.kwargs["flag"] is False
    c = LayerCall((torch.zeros(1, 3, 4),), {**b.kwargs, "flag": True})
    with pytest.raises(ValueError, match="argument differs: False"):
        merge_calls([a, c])
    assert [n for _, n in batches([a, b, c], 2)] == [2, 1]
    assert [n for _, n in batches([a, c], 2)] == [1, 1]  # not batchable: one at a time
