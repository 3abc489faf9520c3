"""Shared fixtures: the tiny checkpoint (built once per session into a temporary cache), its processor."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    # A cache of the tests' own, so they never depend on (or disturb) the user's.
    if "LLAVA_TRAIN_TEST_CACHE" in os.environ:
        cache = Path(os.environ["LLAVA_TRAIN_TEST_CACHE"])
    else:
        cache = tmp_path_factory.mktemp("llava-cache")
    os.environ["LLAVA_TRAIN_CACHE"] = str(cache)
    yield cache


@pytest.fixture(scope="session")
def tiny_dir(_cache) -> Path:
    from llava_train.config import TinyModelConfig
    from llava_train.model.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(TinyModelConfig())


@pytest.fixture(scope="session")
def processor(tiny_dir):
    from llava_train.model.load import load_processor

    return load_processor(str(tiny_dir))


@pytest.fixture
def tiny_model(tiny_dir):
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="session")
def encoder(processor):
    from llava_train.data.dataset import Encoder
    from llava_train.data.images import ImageGeometry
    from llava_train.data.templates import get_family

    return Encoder(processor.tokenizer, get_family("mistral"), ImageGeometry.from_processor(processor),
                   max_length=2048)
