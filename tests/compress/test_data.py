import pytest
import torch

from compress.data import load_text, news_text, token_windows, wiki_text
from compress.errors import CompressError
from tests.conftest import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_builtin_texts_match_the_protocol():
    wiki = wiki_text()
    assert 470_000 < len(wiki.split()) < 490_000  # EVAL.md: about 480k words
    assert "''" not in wiki and "#REDIRECT" not in wiki
    assert news_text().count("\n\n") == 299  # 300 articles


def test_windows_are_consecutive_chunks(tok):
    text = news_text()
    w = token_windows(tok, text, 4, 16, "news")
    ids = tok(text[:2000], add_special_tokens=False)["input_ids"]
    assert w.shape == (4, 16) and w.dtype == torch.long
    assert w.flatten().tolist() == ids[:64]


def test_bos_token_starts_every_window_when_the_tokenizer_adds_one(tok):
    tok.add_bos_token = True
    try:
        w = token_windows(tok, news_text(), 3, 8, "news")
    finally:
        tok.add_bos_token = False
    assert w[:, 0].tolist() == [tok.bos_token_id] * 3
    ids = tok(news_text()[:500], add_special_tokens=False)["input_ids"]
    assert w[:, 1:].flatten().tolist() == ids[:21]


def test_too_little_text_says_how_much_there_is(tok):
    with pytest.raises(CompressError, match=r"calibration: the text has \d+ tokens, enough for \d+ windows of 64"):
        token_windows(tok, "a short text", 64, 64, "calibration")


def test_local_files_and_folders(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.md").write_text("first")
    (tmp_path / "skip.bin").write_bytes(b"\0")
    assert load_text(str(tmp_path)) == "first\n\nsecond"
    assert load_text(str(tmp_path / "b.txt")) == "second"


def test_unknown_source():
    with pytest.raises(CompressError, match="unknown data source 'wikipedia'"):
        load_text("wikipedia")
