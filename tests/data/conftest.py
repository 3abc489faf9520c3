"""Fixtures of the data tests."""

import pytest
from transformers import AutoTokenizer

from llava_train.data.templates import FAMILIES, SPECIAL_TOKENS


@pytest.fixture(scope="session")
def tokenizers(tiny_dir):
    """A stand-in tokenizer per family: the tiny model's Mistral tokenizer with the family's special tokens
    added (real tokenizers per family: tests/model/test_families.py)."""
    out = {}
    for name in FAMILIES:
        tok = AutoTokenizer.from_pretrained(str(tiny_dir))
        if SPECIAL_TOKENS[name]:
            tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[name])})
        out[name] = tok
    return out
