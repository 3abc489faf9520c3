"""The tabled configs of the released checkpoints (offline meta models) and the real-model configs'
data.max_length, recomputed from the geometry with the project's image-token code."""

import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llava_train.cli import CONFIG_DIR
from llava_train.data.images import ImageGeometry, num_image_tokens
from llava_train.model.catalog import KNOWN, geometry, known_config, largest_image_tokens
from llava_train.model.load import checkpoint_config, meta_model

REAL = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml") if p.stem != "tiny")
# parameter counts the checkpoints are known by (billions, as the llava-hf model cards list them)
SIZES = {"llava-v1.6-mistral-7b": 7.57, "llava-v1.6-vicuna-7b": 7.06, "llava-v1.6-vicuna-13b": 13.35,
         "llava-v1.6-34b": 34.8, "llama3-llava-next-8b": 8.36, "llava-next-72b": 72.7, "llava-next-110b": 112}


def _model_cfg(name):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=[f"model={name}", "~experiment"]))


def test_every_real_model_config_is_tabled():
    assert len(REAL) == 7
    assert {_model_cfg(n).model.path for n in REAL} == set(KNOWN)


def test_largest_image_at_the_v16_geometry():
    geo = geometry(known_config("llava-hf/llava-v1.6-mistral-7b-hf"))
    assert (geo.image_size, geo.patch_size) == (336, 14)
    # 672x672 fills the 2x2 grid: 48x48 features + 48 newlines + the 24x24 base image
    assert largest_image_tokens(geo) == num_image_tokens(672, 672, geo) == 48 * 48 + 48 + 576 == 2928
    # no image size gives more (any image maps to a pinpoint and fills at most all of it)
    sizes = [(h, w) for h in range(100, 2100, 97) for w in range(100, 2100, 89)]
    assert max(num_image_tokens(h, w, geo) for h, w in sizes) <= 2928
    assert num_image_tokens(480, 640, geo) == 2340  # design.md's measured count for 640x480


@pytest.mark.parametrize("name", REAL)
def test_real_model_config_carries_a_real_run(name):
    cfg = _model_cfg(name)
    largest = largest_image_tokens(geometry(checkpoint_config(cfg.model.path)))
    assert cfg.data.max_length >= largest + 1024  # the largest image plus a text budget
    assert cfg.model.dtype == "bf16" and cfg.trainer.gradient_checkpointing
    assert cfg.model.attn_implementation == "auto" and cfg.data.pad_to_multiple_of == 8
    assert cfg.data.num_workers > 0


@pytest.mark.parametrize("name", REAL)
def test_tabled_configs_build_meta_models_of_the_known_size(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = checkpoint_config(_model_cfg(name).model.path)  # offline: the table
    model = meta_model(config)
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions == pytest.approx(SIZES[name], rel=0.01)
    assert next(model.parameters()).device == torch.device("meta")


def test_geometry_from_config_equals_the_processors(tiny_dir, processor):
    assert geometry(checkpoint_config(str(tiny_dir))) == ImageGeometry.from_processor(processor)


def test_attn_auto_is_decided_at_load_and_logged(caplog):
    from transformers.utils import is_flash_attn_2_available

    from llava_train.model.load import attn_implementation

    expected = "flash_attention_2" if torch.cuda.is_available() and is_flash_attn_2_available() else "sdpa"
    caplog.set_level(logging.INFO, logger="llava_train")
    assert attn_implementation("auto") == expected
    assert f"model.attn_implementation=auto -> {expected}" in caplog.text
    assert attn_implementation("eager") == "eager"
