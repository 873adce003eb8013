"""Shared fixtures: a tiny random Llama with a real (small, trained-here) tokenizer, saved as a
Hugging Face folder. Tiny models prove mechanics only, never quality (EVAL.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in the CPU interpreter; the variable is read when kernels are defined,
    # so it is set here, before any test module imports them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from compress.data import news_text

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(news_text().splitlines()[:200], trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_model(seed: int = 0, vocab_size: int = 320, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=2, **{**TINY, **overrides})
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny model folder (read-only by convention: tests must not modify it)."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path

