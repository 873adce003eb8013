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


@pytest.fixture(scope="module")
def varied_ckpt(tmp_path_factory):
    """An int4 checkpoint of a tiny model whose greedy decoding does not repeat one token (the
    shared tiny model's does)."""
    from ..conftest import tiny_tokenizer

    folder = tmp_path_factory.mktemp("varied")
    tok = tiny_tokenizer()
    tiny_model(vocab_size=len(tok), initializer_range=0.3).save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    r = cli("quantize", folder / "model", "-o", folder / "int4", "--bits", 4, "--group-size", 32, "--quiet")
    assert r.exit_code == 0, r.output
    return folder / "int4"


@pytest.fixture
def eos_at_4(varied_ckpt, monkeypatch):
    """The checkpoint loaded with an EOS list holding the 4th token greedy decoding gives (and an
    id past the vocabulary): the token id."""
    import compress.commands as commands

    load = commands.load_model
    model, tokenizer, _ = load(str(varied_ckpt), "float32")
    ids = tokenizer("The fire", return_tensors="pt")["input_ids"]
    model.generation_config.eos_token_id = None
    new = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    eos = new[3]
    assert eos not in new[:3], new

    def load_with_eos(*args, **kwargs):
        loaded = load(*args, **kwargs)
        loaded[0].generation_config.eos_token_id = [eos, 100000]
        return loaded

    monkeypatch.setattr(commands, "load_model", load_with_eos)
    return eos


def test_cli_generate_compiled_gives_the_same_text(varied_ckpt, eos_at_4):
    plain = cli("generate", varied_ckpt, "The fire", "--max-new-tokens", 8, "--json")
    compiled = cli("generate", varied_ckpt, "The fire", "--max-new-tokens", 8, "--json", "--compile")
    assert plain.exit_code == 0 and compiled.exit_code == 0, compiled.output
    plain, compiled = json.loads(plain.stdout), json.loads(compiled.stdout)
    assert compiled["compiled"] and not plain["compiled"] and plain["steady_tokens_per_s"] is None
    assert compiled["text"] == plain["text"] and compiled["new_tokens"] == plain["new_tokens"] == 4  # both stop at it
    assert compiled["steady_tokens_per_s"] > 0  # 7 steps: its first look for an EOS comes after 16
    assert_one_line_error(cli("generate", varied_ckpt, "The fire", "--chat"),
                          r"--chat: the tokenizer of .* has no chat template; leave out --chat")


def test_cli_generate_refuses_what_compiling_cannot_do(ckpt, monkeypatch):  # noqa: F811
    assert_one_line_error(cli("generate", ckpt, "", "--max-new-tokens", 4), "the prompt is empty once tokenized")
    assert_one_line_error(cli("generate", ckpt, "The fire", "--max-new-tokens", 1000, "--compile"),
                          r"need 100\d positions, LlamaForCausalLM has 256; ask for fewer new tokens")
    import compress.commands as commands

    load = commands.load_model

    def load_with_penalty(*args, **kwargs):
        loaded = load(*args, **kwargs)
        loaded[0].generation_config.repetition_penalty = 1.3
        return loaded

    monkeypatch.setattr(commands, "load_model", load_with_penalty)
    assert_one_line_error(cli("generate", ckpt, "The fire", "--max-new-tokens", 4, "--compile"),
                          r"--compile decodes by plain argmax, and the generation config of .* sets "
                          r"repetition_penalty=1.3, which generate applies; run without --compile")
    assert cli("generate", ckpt, "The fire", "--max-new-tokens", 4).exit_code == 0


def test_cli_generate_compile_failure_is_one_line(ckpt, monkeypatch):  # noqa: F811
    def refuse(gm, example_inputs):
        raise RuntimeError("this backend compiles nothing")

    monkeypatch.setattr("compress.static_decode.default_compile_options", lambda device: dict(backend=refuse))
    r = cli("generate", ckpt, "The fire", "--max-new-tokens", 4, "--compile")
    assert_one_line_error(r, r"compiled decoding: the forward of this LlamaForCausalLM failed to compile as one graph "
                             r"\(backend='refuse' raised: RuntimeError: this backend compiles nothing\); decode "
                             r"without compiling \(no --compile")


def test_cli_eval_times_compiled_decoding(ckpt):  # noqa: F811
    from compress.evaluate import EvalResult
    from compress.report import eval_table

    r = cli("eval", ckpt, "--windows", 1, "--seq-len", 32, "--compile", "--json")
    assert r.exit_code == 0, r.output
    (result,) = json.loads(r.stdout)
    assert result["decode_compiled"] and result["decode_tps"] > 0
    labels = [eval_table([("m", EvalResult(1.0, 1, decode_compiled=compiled), None, None)], "t").columns[0]._cells[-1]
              for compiled in (False, True)]
    assert labels == ["decode tokens/s", "decode tokens/s (compiled)"]
