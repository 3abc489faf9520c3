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


_FAMILY_DIRS: dict[str, Path] = {}


def tiny_family_dir(family: str) -> Path:
    """The tiny checkpoint of a prompt family with its real tokenizer (chatml: a stand-in), built once per
    session; skips the test when that tokenizer is not available here (vicuna's Llama-2 file is read from
    `../shared/tokenizers/llama2/` beside the repository, or $LLAVA_TRAIN_LLAMA2_TOKENIZER)."""
    from llava_train.config import TinyModelConfig
    from llava_train.model.tiny import ensure_tiny_checkpoint

    if family not in _FAMILY_DIRS:
        try:
            _FAMILY_DIRS[family] = ensure_tiny_checkpoint(TinyModelConfig(), family=family)
        except FileNotFoundError as err:
            pytest.skip(f"{family}: its real tokenizer is not available here: {err}")
    return _FAMILY_DIRS[family]


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
    from llava_train.data.encoder import Encoder
    from llava_train.data.images import ImageGeometry
    from llava_train.data.templates import get_family

    return Encoder(processor.tokenizer, get_family("mistral"), ImageGeometry.from_processor(processor),
                   max_length=2048)


class _TrainedRun:
    """One short LoRA run of the tiny model shared by the eval / export / tracking / chat tests."""

    def __init__(self, out: Path, eval_path: Path, stdout: str, results: dict, model):
        self.out, self.eval_path, self.stdout, self.results, self.model = out, eval_path, stdout, results, model


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_dir):
    """`llava train` in-process (logger=wandb offline, in-training eval every 8 steps) for 16 steps on a
    32-sample slice of the demo eval split; keeps the model exactly as it was when training ended."""
    import contextlib
    import copy
    import io
    import json
    import logging
    import sys

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from transformers import TrainerCallback

    from llava_train.cli import CONFIG_DIR
    from llava_train.train.recipe import run

    root = tmp_path_factory.mktemp("trained")
    eval_path = root / "eval_demo32.json"
    eval_path.write_text(json.dumps(json.loads((DEMO / "eval.json").read_text())[:32]))
    out = root / "run"
    overrides = ["model=tiny", "peft=lora", "logger=wandb", "logger.tags=[test]", f"output_dir={out}",
                 f"data.train_path={DEMO / 'train.json'}", f"data.eval_path={eval_path}", f"data.image_root={DEMO}",
                 "trainer.max_steps=16", "trainer.per_device_train_batch_size=8", "trainer.logging_steps=4",
                 "trainer.save_steps=8", "trainer.disable_tqdm=true", "eval.every_steps=8", "eval.max_samples=8",
                 "eval.table_rows=4"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="train", overrides=overrides))

    class KeepFinalModel(TrainerCallback):
        model = None

        def on_train_end(self, args, state, control, model=None, **kwargs):
            KeepFinalModel.model = copy.deepcopy(model).eval()

    class Tee(io.StringIO):
        def write(self, s):
            sys.__stdout__.write(s)
            return super().write(s)

    buf = Tee()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(root / "wandb-home"))
        # the run's log lines (the CLI's Hydra console handler writes them to stdout), into the same buffer
        handler = logging.StreamHandler(buf)
        package_log = logging.getLogger("llava_train")
        package_log.addHandler(handler)
        mp.setattr(package_log, "propagate", False)
        try:
            with contextlib.redirect_stdout(buf):
                results = run(cfg, str(out), callbacks=[KeepFinalModel()])
        finally:
            package_log.removeHandler(handler)
    return _TrainedRun(out, eval_path, buf.getvalue(), results, KeepFinalModel.model)


@pytest.fixture(scope="session")
def tokenizers(tiny_dir):
    """A stand-in tokenizer per family: the tiny model's Mistral tokenizer with the family's special tokens
    added (the data tests; real tokenizers per family: tests/model/test_families.py)."""
    from transformers import AutoTokenizer

    from llava_train.data.templates import FAMILIES, SPECIAL_TOKENS

    out = {}
    for name in FAMILIES:
        tok = AutoTokenizer.from_pretrained(str(tiny_dir))
        if SPECIAL_TOKENS[name]:
            tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[name])})
        out[name] = tok
    return out
