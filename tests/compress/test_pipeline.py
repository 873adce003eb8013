import pytest

from compress.errors import CompressError
from compress.pipeline import apply_override, load_file, parse
from compress.quant.rtn import RTNConfig

BASE = {"model": "smollm2-135m", "steps": [{"method": "rtn", "bits": 4, "group_size": 64}]}


def with_step(**step):
    return {**BASE, "steps": [{"method": "rtn", **step}]}


def test_valid_pipeline_has_typed_steps_and_protocol_defaults():
    p = parse(BASE)
    assert isinstance(p.steps[0], RTNConfig) and p.steps[0].bits == 4
    assert p.eval.windows == 64 and p.eval.fidelity_windows == 8 and p.calibration.samples == 64
    assert p.steps[0].ignore == ["lm_head"]


@pytest.mark.parametrize(
    "raw, message",
    [
        (with_step(bitz=3), r"steps\[0\]\.bitz: unknown key \(valid keys: .*bits.*\); did you mean 'bits'\?"),
        (with_step(bits=9), r"steps\[0\]\.bits: Input should be less than or equal to 8 \(got 9\)"),
        (with_step(bits=1), r"steps\[0\]\.bits: .*greater than or equal to 2"),
        (with_step(bits="four"), r"steps\[0\]\.bits: .*valid integer"),
        (with_step(group_size=4), r"steps\[0\]\.group_size: .*-1 \(per-channel\) or at least 8"),
        (with_step(scale_dtype="int8"), r"scale_dtype: Input should be 'float16', 'bfloat16' or 'float32'"),
        (with_step(targets=["re:(x"]), r"steps\[0\]: invalid regex"),
        ({**BASE, "steps": [{"method": "rtm"}]}, r"steps\[0\]\.method: unknown method 'rtm' .*did you mean 'rtn'"),
        ({**BASE, "steps": [{"bits": 4}]}, r"steps\[0\]: expected a mapping with a 'method' key"),
        ({**BASE, "steps": []}, r"steps: expected a non-empty list"),
        ({**BASE, "evaluation": {}}, r"evaluation: unknown key \(valid keys: version, model, "),
        ({**BASE, "eval": {"windowz": 3}}, r"eval\.windowz: unknown key .*did you mean 'windows'"),
        ({**BASE, "device": "gpu"}, r"device: String should match pattern"),
        ({"steps": BASE["steps"]}, r"model: required key is missing"),
        ([1, 2], r"expected a mapping"),
    ],
)
def test_bad_pipelines_are_reported_with_location_and_choices(raw, message):
    with pytest.raises(CompressError, match=message):
        parse(raw, "p.yaml")


def test_eval_null_skips_evaluation():
    assert parse({**BASE, "eval": None}).eval is None


def test_overrides_are_typed_and_indexed():
    raw = {**BASE, "steps": [dict(BASE["steps"][0])]}
    apply_override(raw, "steps.0.bits=3")
    apply_override(raw, "steps.0.symmetric=false")
    apply_override(raw, "eval.windows=2")
    p = parse(raw)
    assert p.steps[0].bits == 3 and p.steps[0].symmetric is False and p.eval.windows == 2
    with pytest.raises(CompressError, match="steps.5 is not an index of a list of 1"):
        apply_override(raw, "steps.5.bits=3")
    with pytest.raises(CompressError, match="expected KEY=VALUE"):
        apply_override(raw, "steps.0.bits")


def test_malformed_yaml_names_the_line(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("model: x\nsteps:\n  - method: rtn\n   bits: 3\n")
    with pytest.raises(CompressError, match=r"p\.yaml:4:4: malformed YAML"):
        load_file(f)


def test_every_example_pipeline_is_valid():
    from pathlib import Path

    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
    assert examples
    for f in examples:
        assert load_file(f).steps
