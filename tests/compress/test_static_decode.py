"""StaticDecoder (compress/static_decode.py) decodes what `model.generate` decodes, stopping after
the same end-of-sequence token, and `compress generate --compile` runs it; traced as one graph
(fullgraph) by dynamo, here without inductor where the test is about the loop, with it through
the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from compress.static_decode import EOS_EVERY, WARM_STEPS, StaticDecoder

from ..conftest import tiny_model
from .test_cli import assert_one_line_error, cli, ckpt  # noqa: F401 (ckpt: the tiny int4 checkpoint fixture)

TRACED = dict(backend="eager", fullgraph=True)


@pytest.fixture(scope="module")
def model():
    # weights large enough that greedy decoding does not settle on one token (at the default 0.02
    # it repeats one for good), and few tokens, so that some first come late for an EOS
    m = tiny_model(vocab_size=64, initializer_range=0.3)
    m.generation_config.eos_token_id = None  # generate stops only where a test says
    return m


def _generate(model, ids, tokens, eos=None):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0, eos_token_id=eos,
                              cache_implementation="static")


def _prompt():
    return torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(0))


def test_decodes_as_generate_and_times_the_steps_after_compiling(model):
    ids = _prompt()
    expected = _generate(model, ids, 12)
    decoder = StaticDecoder(model, 6, 12, TRACED)
    assert len(set(expected[0, 6:].tolist())) > 6
    for _ in range(2):  # the cache is reset between calls
        assert torch.equal(decoder(ids), expected)
    t = decoder.timing
    assert t["new_tokens"] == 12 and t["steady_tokens"] == 12 - 1 - WARM_STEPS  # the prompt's forward gives the first
    assert 0 < t["steady_seconds"] < t["seconds"]


@pytest.mark.parametrize("late", [False, True], ids=["before-first-look", "after-last-look"])
def test_stops_after_the_first_eos_as_generate_does(model, late):
    """An EOS among the first EOS_EVERY new tokens ends the loop at the first look; one after the
    last look is cut off at the end."""
    ids = _prompt()
    free = _generate(model, ids, 24)[0, 6:].tolist()
    first = {}
    for i, token in enumerate(free):
        first.setdefault(token, i)
    lo, hi = (EOS_EVERY, 24) if late else (1, EOS_EVERY)
    eos = next((tok for tok, i in first.items() if lo <= i < hi and tok not in (1, 2)), None)
    assert eos is not None, f"no token first decoded at {lo}..{hi - 1}: {free}"
    expected = _generate(model, ids, 24, eos)
    assert expected[0, -1] == eos and expected.shape[1] == 6 + first[eos] + 1
    decoder = StaticDecoder(model, 6, 24, TRACED, eos=[eos, 1000])
    assert torch.equal(decoder(ids), expected)
    assert decoder.timing["new_tokens"] == first[eos] + 1
    steps = 24 - 1 if late else EOS_EVERY - 1  # an early EOS saves the steps after the first look
    assert decoder.timing["steady_tokens"] == steps - WARM_STEPS


def test_bad_prompts_are_refused(model):
    decoder = StaticDecoder(model, 6, 4, TRACED)
    with pytest.raises(ValueError, match=r"prompt of shape \(1, 6\), got \(1, 5\)"):
        decoder(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="needs a prompt and new tokens, not 6 and 0"):
        StaticDecoder(model, 6, 0, TRACED)


def test_cli_generate_compiled_gives_the_same_text(ckpt):  # noqa: F811
    plain = cli("generate", ckpt, "The fire", "--max-new-tokens", 8, "--json")
    compiled = cli("generate", ckpt, "The fire", "--max-new-tokens", 8, "--json", "--compile")
    assert plain.exit_code == 0 and compiled.exit_code == 0, compiled.output
    plain, compiled = json.loads(plain.stdout), json.loads(compiled.stdout)
    assert compiled["compiled"] and not plain["compiled"] and plain["steady_tokens_per_s"] is None
    assert compiled["text"] == plain["text"] and compiled["new_tokens"] == plain["new_tokens"]
    assert compiled["steady_tokens_per_s"] > 0


def test_cli_generate_compile_failure_is_one_line(ckpt, monkeypatch):  # noqa: F811
    def refuse(gm, example_inputs):
        raise RuntimeError("this backend compiles nothing")

    monkeypatch.setattr("compress.static_decode.default_compile_options", lambda device: dict(backend=refuse))
    r = cli("generate", ckpt, "The fire", "--max-new-tokens", 4, "--compile")
    assert_one_line_error(r, r"--compile: the forward of .* does not compile as one graph .*run without --compile")
