import json

import pytest
import torch

from compress import checkpoint
from compress.errors import CompressError
from compress.pipeline import parse
from compress.runner import compress_model
from tests.conftest import tiny_model

X = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))


def compressed(ignore=("lm_head",), **step):
    model = tiny_model()
    compress_model(model, None, parse({"model": "x", "steps": [{"method": "rtn", "ignore": list(ignore), **step}]}))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = compressed(bits=4, group_size=16)
    path = tmp_path_factory.mktemp("ck") / "out"
    checkpoint.save(model, None, path, {"base_model": {"ref": "tiny", "model_type": "llama"}, "steps": []}, False)
    return model, path


def test_reload_gives_bit_identical_logits(saved):
    model, path = saved
    loaded = checkpoint.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(X).logits, model(X).logits)
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"
    # tied embeddings are stored once and shared again after loading
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_quantized_head_and_its_tied_embeddings_reload(tmp_path):
    """(Embeddings tied to a quantized head read its codes: tests/quant/test_embedding.py.)"""
    model = compressed(ignore=(), bits=8, group_size=-1)
    assert type(model.lm_head).__name__ == "QuantLinear"
    assert type(model.model.embed_tokens).__name__ == "QuantEmbedding"
    checkpoint.save(model, None, tmp_path / "o", {"steps": []}, False)
    loaded = checkpoint.load(tmp_path / "o")
    assert not loaded.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.equal(loaded(X).logits, model(X).logits)


def test_manifest_records_formats_and_versions(saved):
    _, path = saved
    manifest = json.loads((path / "compress.json").read_text())
    assert manifest["version"] == checkpoint.VERSION and "torch" in manifest["created_by"]
    entry = manifest["modules"]["model.layers.1.self_attn.q_proj"]
    assert entry["format"] == "QuantLinear" and entry["spec"]["bits"] == 4 and entry["scheme"] == "int4 g16 sym"
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}


def test_existing_output_is_refused_and_kept(saved):
    model, path = saved
    before = sorted(p.name for p in path.iterdir())
    with pytest.raises(CompressError, match="already exists.*--overwrite"):
        checkpoint.save(model, None, path, {}, False)
    assert sorted(p.name for p in path.iterdir()) == before


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model = compressed(bits=4, group_size=16)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "write_tensors", boom)
    with pytest.raises(RuntimeError):
        checkpoint.save(model, None, tmp_path / "o", {}, False)
    assert list(tmp_path.iterdir()) == []


def copy_of(path, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def test_truncated_tensor_file(saved, tmp_path):
    path = copy_of(saved[1], tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CompressError, match="model.safetensors is truncated or corrupt"):
        checkpoint.load(path)


def test_missing_tensor_file(saved, tmp_path):
    path = copy_of(saved[1], tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CompressError, match="has no tensor file"):
        checkpoint.load(path)


def test_unknown_manifest_version(saved, tmp_path):
    path = copy_of(saved[1], tmp_path)
    m = json.loads((path / "compress.json").read_text())
    (path / "compress.json").write_text(json.dumps({**m, "version": 99}))
    with pytest.raises(CompressError, match="manifest version 99; this compress reads version 1"):
        checkpoint.load(path)


def test_missing_tensor_in_file(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    path = copy_of(saved[1], tmp_path)
    state = load_file(path / "model.safetensors")
    del state["model.layers.0.mlp.up_proj.scales"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(CompressError, match="lacks tensors model.layers.0.mlp.up_proj.scales"):
        checkpoint.load(path)


def test_sharded_checkpoint_with_missing_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "MAX_SHARD_SIZE", 40_000)
    model = compressed(bits=4, group_size=16)
    checkpoint.save(model, None, tmp_path / "o", {}, False)
    shards = sorted((tmp_path / "o").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "o" / checkpoint.INDEX_NAME).is_file()
    with torch.no_grad():
        assert torch.equal(checkpoint.load(tmp_path / "o")(X).logits, model(X).logits)
    shards[-1].unlink()
    with pytest.raises(CompressError, match=f"missing tensor file {shards[-1].name}"):
        checkpoint.load(tmp_path / "o")
