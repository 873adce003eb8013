import pytest

from compress.errors import CompressError
from compress.models import check_model_folder, resolve


def test_non_gguf_file_is_refused(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(CompressError, match="is a file; expected a model folder"):
        resolve(str(f))


def test_corrupt_gguf_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(CompressError, match="cannot read GGUF file .*broken.gguf"):
        resolve(str(f))
    assert not any((tmp_path / "cache").rglob("config.json"))


def test_model_folder_checks(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CompressError, match="has no weight files"):
        check_model_folder(tmp_path, allow_pickle=False)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CompressError, match="only pickle weights"):
        check_model_folder(tmp_path, allow_pickle=False)
    assert check_model_folder(tmp_path, allow_pickle=True) == tmp_path
