"""Text sources by name, and their tokenization into fixed-length windows.

A source is one of:
- `wiki`: the Wikipedia excerpt shipped in the gensim wheel (evaluation text of EVAL.md);
- `news`: the Lee news corpus shipped in the gensim wheel (calibration text of EVAL.md);
- a local text file, or a folder of `.txt` / `.md` files (read in sorted order);
- `hf:<dataset>[:<config>]` with `split` and `text_field`, through the `datasets` package.
"""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path

import torch

from .errors import CompressError

BUILTIN = ("wiki", "news")
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"


def _gensim_test_data(filename: str) -> Path:
    # The gensim wheel ships its test corpora; locate them without importing gensim.test.
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise CompressError("the built-in texts come from the gensim package; run: pip install gensim==4.4.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / filename
    if not path.is_file():
        raise CompressError(f"{path} is missing from the gensim installation; reinstall gensim==4.4.0")
    return path


@cache
def wiki_text() -> str:
    """106 Wikipedia articles, cleaned of markup, joined by blank lines (EVAL.md)."""
    import bz2

    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(_gensim_test_data(WIKI_FILE), "rb") as f:
        for _title, text, _pageid in extract_pages(f):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            articles.append(re.sub(r"''+", "", filter_wiki(text)))
    return "\n\n".join(articles)


@cache
def news_text() -> str:
    """300 news articles (one a line in the file), joined by blank lines."""
    lines = _gensim_test_data(NEWS_FILE).read_text(encoding="utf-8").splitlines()
    return "\n\n".join(line.strip() for line in lines if line.strip())


def load_text(source: str, split: str = "train", text_field: str = "text") -> str:
    """The text of a named source, a local file or folder, or a Hugging Face dataset."""
    if source == "wiki":
        return wiki_text()
    if source == "news":
        return news_text()
    if source.startswith("hf:"):
        return _hf_text(source[3:], split, text_field)
    path = Path(source).expanduser()
    if path.is_file():
        return _read(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            raise CompressError(f"data folder {path} has no .txt or .md files")
        return "\n\n".join(_read(p) for p in files)
    raise CompressError(
        f"unknown data source '{source}': use {' or '.join(BUILTIN)}, a text file or folder, or hf:<dataset>[:<config>]"
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CompressError(f"cannot read data file {path}: {e}") from None


def _hf_text(spec: str, split: str, text_field: str) -> str:
    if importlib.util.find_spec("datasets") is None:
        raise CompressError("hf: data sources need the datasets package; run: pip install 'compress-llm[datasets]'")
    import datasets

    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # network, missing dataset and schema errors all come as different types
        raise CompressError(f"cannot load dataset '{spec}' (split {split}): {type(e).__name__}: {e}") from None
    if text_field not in ds.column_names:
        raise CompressError(f"dataset '{spec}' has no column '{text_field}' (columns: {', '.join(ds.column_names)})")
    return "\n\n".join(t for t in ds[text_field] if t)


def token_windows(tokenizer, text: str, count: int, seq_len: int, what: str) -> torch.Tensor:
    """The first `count` consecutive non-overlapping windows of `seq_len` tokens: long [count, seq_len].

    No special tokens are added to the text; a tokenizer that adds a beginning-of-sequence token
    by default gets it at the start of every window, which then holds seq_len - 1 text tokens.
    """
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
    body = seq_len - (bos is not None)
    needed = count * body
    # Tokenize only as much text as needed: about 4 characters a token, with a margin.
    chars = min(len(text), needed * 8)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        if len(ids) > needed or chars >= len(text):
            break
        chars = min(len(text), chars * 2)
    if len(ids) < needed:
        raise CompressError(
            f"{what}: the text has {len(ids)} tokens, enough for {len(ids) // body} windows of {seq_len}; "
            f"{count} were requested ({needed} tokens). Use fewer windows, a shorter length, or more text"
        )
    windows = torch.tensor(ids[:needed], dtype=torch.long).view(count, body)
    if bos is not None:
        windows = torch.cat([torch.full((count, 1), bos, dtype=torch.long), windows], dim=1)
    return windows
