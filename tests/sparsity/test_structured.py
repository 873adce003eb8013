"""Structured pruning (`compress shrink`): exact unit counts, grouped-query attention kept whole,
bias compensation restoring the mean output, and a smaller model that plain transformers reloads
with the same logits; bad input is one line with nothing written. Tiny models: mechanics only."""

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from compress.cli import app
from compress.data import news_text
from compress.sparsity import structured
from tests.conftest import tiny_model, tiny_tokenizer

runner = CliRunner()
FAST = ["--samples", "4", "--seq-len", "32", "--quiet"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def folder_digest(path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


# tiny model: hidden 64, intermediate 96, 4 query heads in 2 groups of head_dim 16, 2 layers;
# Linear weights per layer: q, o 64 x 64; k, v 32 x 64; gate, up, down 64 x 96 -> 30720
@pytest.mark.parametrize("unit,remove,config", [
    ("channels", 0.2, {"intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}),  # 32 ch
    ("heads", 0.2, {"intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1}),  # 1 group
    ("layers", 0.5, {"num_hidden_layers": 1, "intermediate_size": 96, "num_attention_heads": 4}),
])
def test_shrink_writes_a_smaller_model_that_plain_transformers_reloads(tiny_dir, tmp_path, unit, remove, config):
    before = folder_digest(tiny_dir)
    out = tmp_path / unit
    compensate = ["--compensate"] if unit != "layers" else []  # Llama's config can declare the biases
    r = cli("shrink", tiny_dir, "-o", out, "--unit", unit, "--remove", remove, *compensate, *FAST, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["removed_fraction"] == pytest.approx({"channels": 0.2, "heads": 0.2, "layers": 0.5}[unit])
    assert summary["compensate"] == (unit != "layers")
    assert folder_digest(tiny_dir) == before  # the input model is untouched
    model = AutoModelForCausalLM.from_pretrained(out)
    for key, value in config.items():
        assert getattr(model.config, key) == value, key
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.weight.shape == (64, model.config.intermediate_size)
    assert layer.self_attn.q_proj.weight.shape == (model.config.num_attention_heads * 16, 64)
    assert layer.self_attn.k_proj.weight.shape == (model.config.num_key_value_heads * 16, 64)
    base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_dir).parameters())
    assert sum(p.numel() for p in model.parameters()) == summary["params_after"] < base
    ids = torch.randint(0, 300, (1, 12))
    assert torch.isfinite(model(ids).logits).all()
    removed = json.loads((out / "structured_pruning.json").read_text())["removed"]
    assert [len(r) for r in removed] == {"channels": [32, 32], "heads": [1, 1], "layers": [1]}[unit]


def stats_and_model(seed=0):
    tok = tiny_tokenizer()
    model = tiny_model(seed, vocab_size=len(tok))
    from compress.data import token_windows

    windows = token_windows(tok, news_text(), 4, 32, "test")
    return model, windows, structured.collect_stats(model, windows, 2)


def test_removed_channels_are_the_lowest_scored():
    model, _, stats = stats_and_model()
    p = structured.plan(model, stats, "channels", 0.2, compensate=True)
    for removed, scores in zip(p.removed, p.scores):
        assert len(removed) == 32
        kept = set(range(96)) - set(removed)
        assert max(scores[i] for i in removed) <= min(scores[i] for i in kept)


def test_a_removed_head_group_takes_its_query_heads_and_the_rest_stay_in_place():
    """3 groups of 2 query heads (head_dim 16): the kept k/v rows, q rows and o columns are the
    original ones of the kept groups, in order (Llama's layout: query heads 2g, 2g + 1 use k/v head g)."""
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok), hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=16)
    from compress.data import token_windows

    windows = token_windows(tok, news_text(), 4, 32, "test")
    stats = structured.collect_stats(model, windows, 2)
    original = [{k: getattr(layer.self_attn, k).weight.clone() for k in ("q_proj", "k_proj", "v_proj", "o_proj")}
                for layer in model.model.layers]
    p = structured.plan(model, stats, "heads", 0.2, compensate=False)
    assert all(len(g) == 1 for g in p.removed)
    structured.apply(model, p, stats)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    for layer, (gone,), w in zip(model.model.layers, p.removed, original):
        kept = [g for g in range(3) if g != gone]
        kv_rows = torch.cat([torch.arange(16 * g, 16 * (g + 1)) for g in kept])
        q_rows = torch.cat([torch.arange(32 * g, 32 * (g + 1)) for g in kept])
        attn = layer.self_attn
        assert torch.equal(attn.k_proj.weight, w["k_proj"][kv_rows])
        assert torch.equal(attn.v_proj.weight, w["v_proj"][kv_rows])
        assert torch.equal(attn.q_proj.weight, w["q_proj"][q_rows])
        assert torch.equal(attn.o_proj.weight, w["o_proj"][:, q_rows])


def test_head_groups_removed_leave_a_head_count_transformers_accepts():
    # Llama-3.2-1B: 8 groups of 4 query heads, hidden 2048; 5 groups would leave 12 heads (2048 % 12 != 0)
    assert structured._loadable_groups(5, 8, 4, 2048) == 4
    assert structured._loadable_groups(1, 3, 3, 576) == 1  # smollm2-135m: 6 heads divide 576
    with pytest.raises(structured.CompressError, match="divides the hidden size 60"):
        structured._loadable_groups(1, 2, 7, 60)


@pytest.mark.parametrize("unit,module", [("channels", "mlp"), ("heads", "self_attn")])
@pytest.mark.parametrize("compensate", [True, False])
def test_bias_compensation_keeps_the_mean_output_of_the_pruned_block(unit, module, compensate):
    """The first layer's MLP (or attention) sees the same inputs before and after: with
    compensation its mean output over the calibration tokens is unchanged (the removed units'
    mean contribution is in the bias); without, it moves."""
    model, windows, stats = stats_and_model()
    means = []

    def grab(_, args, output):
        out = output[0] if isinstance(output, tuple) else output
        means.append(out.detach().reshape(-1, out.shape[-1]).double().mean(0))

    for _ in range(2):
        handle = model.model.layers[0].get_submodule(module).register_forward_hook(grab)
        with torch.no_grad():
            model(windows, use_cache=False)
        handle.remove()
        if len(means) == 1:
            structured.apply(model, structured.plan(model, stats, unit, 0.3 if unit == "channels" else 0.2,
                                                    compensate), stats)
    shift = (means[1] - means[0]).norm() / means[0].norm()
    assert (shift < 1e-5) if compensate else (shift > 1e-2), shift.item()


def test_layers_removed_are_those_that_change_their_input_least():
    model, _, stats = stats_and_model()
    p = structured.plan(model, stats, "layers", 0.5, compensate=False)
    (scores,) = p.scores
    assert p.removed == [[min(range(2), key=scores.__getitem__)]]
    p.removed = [[0]]  # the first layer, so that the one left must be renumbered
    structured.apply(model, p, stats)
    assert len(model.model.layers) == 1 and model.model.layers[0].self_attn.layer_idx == 0
    ids = torch.randint(3, 300, (1, 8))
    cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=2)
    uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=2)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("args,pattern", [
    (["--remove", "1.2"], r"--remove must be a fraction .* \(0, 1\), got 1.2"),
    (["--remove", "0"], r"--remove must be a fraction"),
    (["--unit", "blocks"], r"unknown unit 'blocks'; choose one of channels, heads, layers"),
    (["--unit", "heads", "--remove", "0.6"],
     r"would remove 3 of the 2 key/value head groups per layer, leaving none; ask for at most 0.2"),
    (["--unit", "layers", "--remove", "0.9"],
     r"would remove 2 of the 2 decoder layers, leaving none; ask for at most 0.5"),
    (["--unit", "layers", "--remove", "0.1"],
     r"less than one of the decoder layers \(0.5 of them\); ask for at least 0.25"),
    (["--unit", "layers", "--remove", "0.5", "--compensate"], r"--compensate applies to channels and heads"),
])
def test_shrink_bad_input_is_one_line_and_writes_nothing(tiny_dir, tmp_path, args, pattern):
    from tests.compress.test_cli import assert_one_line_error

    out = tmp_path / "o"
    assert_one_line_error(cli("shrink", tiny_dir, "-o", out, *args, *FAST), pattern)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_shrink_refuses_a_compressed_checkpoint(tiny_dir, tmp_path):
    from tests.compress.test_cli import assert_one_line_error

    ckpt = tmp_path / "q"
    assert cli("quantize", tiny_dir, "-o", ckpt, "--bits", "4", "--group-size", "32", "--quiet").exit_code == 0
    assert_one_line_error(cli("shrink", ckpt, "-o", tmp_path / "o", *FAST), r"is a compressed checkpoint")
