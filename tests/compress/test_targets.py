import pytest
from torch import nn

from compress.errors import CompressError
from compress.targets import check_patterns, resolve, select
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def test_class_name_selects_all_linears_minus_ignore(model):
    names = select(model, ["Linear"], ["lm_head"], (nn.Linear,)).names
    assert names == [n for n in linears(model) if n != "lm_head"] and len(names) == 14


def test_trailing_name_and_container(model):
    assert select(model, ["down_proj"], [], (nn.Linear,)).names == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert select(model, ["LlamaMLP"], ["up_proj"], (nn.Linear,)).names == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.down_proj"]


def test_regex_matches_whole_name(model):
    assert select(model, [r"re:.*layers\.1\..*_proj"], ["re:.*self_attn.*"], (nn.Linear,)).names == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert select(model, ["re:layers"], [], (nn.Linear,)).names == []  # not a full match


def test_ignore_container(model):
    names = select(model, ["Linear"], ["model.layers.0", "lm_head"], (nn.Linear,)).names
    assert names and all(n.startswith("model.layers.1.") for n in names)


def test_unmatched_target_is_an_error_naming_it(model):
    with pytest.raises(CompressError, match="target 'gate_prj' matches no module"):
        resolve(model, ["Linear", "gate_prj"], [], (nn.Linear,), "steps[0]")


def test_everything_ignored_is_an_error(model):
    with pytest.raises(CompressError, match="leave no Linear module"):
        resolve(model, ["lm_head"], ["lm_head"], (nn.Linear,), "steps[0]")


def test_bad_regex():
    with pytest.raises(CompressError, match="invalid regex"):
        check_patterns(["re:(unclosed"])
