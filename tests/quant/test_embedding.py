"""Embeddings tied to a quantized head read its codes (quant/embedding.py): one matrix stays one."""

import json

import pytest
import torch
from torch import nn

import compress
from compress import checkpoint
from compress.errors import CompressError
from compress.loading import load_model
from compress.pipeline import parse
from compress.quant.embedding import QuantEmbedding
from compress.runner import compress_model
from tests.conftest import tiny_model

X = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
HEAD = {"method": "rtn", "targets": ["lm_head"], "ignore": []}


def quantized_head(model: nn.Module, **step) -> list:
    return compress_model(model, None, parse({"model": "x", "steps": [{**HEAD, **step}]}))


@pytest.mark.parametrize("step,max_error", [({"bits": 8, "group_size": -1}, 0.01),  # measured 0.006
                                            ({"bits": 4, "group_size": 16, "symmetric": False}, 0.1),  # 0.069
                                            ({"bits": 3, "group_size": 48, "symmetric": False}, 0.25)])  # 0.177
def test_quantized_tied_head_keeps_the_embeddings_tied(step, max_error, tmp_path):
    model = tiny_model()
    floats = model.model.embed_tokens.weight.detach().clone()
    report = quantized_head(model, **step)[0]
    emb, head = model.model.embed_tokens, model.lm_head
    assert type(emb) is QuantEmbedding and emb._head == (head,) and (head.qzeros is None) == ("symmetric" not in step)
    assert "model.embed_tokens.lm_head" not in dict(model.named_modules())  # not a second path to the head
    assert report.modules[0].read_by == ["model.embed_tokens"]
    with torch.no_grad():
        rows = emb(X)
        assert rows.shape == (2, 24, 64) and torch.equal(rows, head.dequantized_weight()[X])
        assert 0 < (rows - floats[X]).norm() / floats[X].norm() < max_error

    checkpoint.save(model, None, tmp_path / "o", {"steps": []}, False)
    manifest = json.loads((tmp_path / "o" / "compress.json").read_text())
    assert manifest["modules"]["model.embed_tokens"]["bytes"] == 0  # the head's bytes, counted there
    loaded = checkpoint.load(tmp_path / "o")
    assert loaded.model.embed_tokens._head == (loaded.lm_head,) and not loaded.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.equal(loaded(X).logits, model(X).logits)


def test_the_tied_matrix_is_stored_once(tiny_dir, tmp_path):
    """Through `compress run` (layers streamed, the head compressed last): the checkpoint holds the
    head's codes and no float embedding matrix, and loads in bf16 with bf16 embeddings; moving
    the model leaves the embeddings reading the head's moved tensors (no second copy)."""
    result = compress.run({"model": str(tiny_dir), "steps": [{**HEAD, "bits": 8, "group_size": -1}], "eval": None,
                           "output": str(tmp_path / "o")})
    assert result.steps[0].modules[0].read_by == ["model.embed_tokens"]
    names = set(checkpoint.read_tensors(tmp_path / "o"))
    assert "lm_head.qweight" in names and not any(n.startswith("model.embed_tokens.") for n in names)
    model, _, _ = load_model(str(tmp_path / "o"), dtype="bfloat16")
    assert model.model.embed_tokens(X).dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(X).logits).all()
    model.to("meta")
    assert model.model.embed_tokens(X.to("meta")).is_meta


def test_embeddings_follow_the_model_dtype_and_refuse_to_run_unlinked(tiny_dir, tmp_path):
    model = tiny_model()
    quantized_head(model, bits=8, group_size=-1)
    assert model.half().model.embed_tokens(X).dtype == torch.float16
    unlinked = QuantEmbedding.from_spec(model.model.embed_tokens.format_spec())
    with pytest.raises(RuntimeError, match="embeddings tied to lm_head are not linked to it"):
        unlinked(X)


def test_info_shows_the_tied_embeddings(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from compress.cli import app

    compress.run({"model": str(tiny_dir), "steps": [{**HEAD, "bits": 8, "group_size": -1}], "eval": None,
                  "output": str(tmp_path / "o")})
    r = CliRunner().invoke(app, ["info", str(tmp_path / "o")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "QuantEmbedding" in r.stdout and "lm_head's codes (tied)" in r.stdout


def test_embeddings_the_codes_cannot_serve_keep_the_float_matrix():
    """A head format without codes to read (fp8), or embeddings that renormalize rows (max_norm):
    the embeddings keep the float weight, untied as before."""
    for step, max_norm in (({"method": "fp8"}, None), ({"bits": 8, "group_size": -1}, 10.0)):
        model = tiny_model()
        model.model.embed_tokens.max_norm = max_norm
        floats = model.model.embed_tokens.weight.detach().clone()
        report = quantized_head(model, **step)[0]
        assert type(model.model.embed_tokens) is nn.Embedding and report.modules[0].read_by == []
        assert torch.equal(model.model.embed_tokens.weight, floats) and not model.config.tie_word_embeddings


def test_a_tie_to_a_module_that_is_not_the_head_is_refused(tmp_path):
    model = tiny_model()
    quantized_head(model, bits=8, group_size=-1)
    checkpoint.save(model, None, tmp_path / "o", {"steps": []}, False)
    manifest_file = tmp_path / "o" / "compress.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["modules"]["model.embed_tokens"]["spec"]["tied_to"] = "model.norm"
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(CompressError, match="model.embed_tokens cannot be linked .*need a QuantLinear of 320 x 64"):
        checkpoint.load(tmp_path / "o")
