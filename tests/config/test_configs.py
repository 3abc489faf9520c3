"""Every file in configs/ composes over the typed schema; overrides are type-checked."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llava_train.cli import CONFIG_DIR
from llava_train.config import TrainJobConfig

GROUPS = sorted(p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((Path(CONFIG_DIR) / g).glob("*.yaml"))]


def _compose(overrides, name="train"):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=False)


def test_every_group_has_files():
    assert {"model", "data", "peft", "trainer", "deepspeed", "experiment"} <= set(GROUPS)
    assert len(OPTIONS) >= 14


@pytest.mark.parametrize("group,name", OPTIONS, ids=[f"{g}={n}" for g, n in OPTIONS])
def test_config_file_composes(group, name):
    key = f"{group}={name}"
    cfg = _compose([key])
    job = OmegaConf.to_object(cfg)
    assert isinstance(job, TrainJobConfig)


def test_real_checkpoints_point_at_hub_ids():
    for name, family in [("llava-v1.6-mistral-7b", "mistral"), ("llava-v1.6-vicuna-7b", "vicuna"),
                         ("llava-v1.6-vicuna-13b", "vicuna"), ("llava-v1.6-34b", "chatml"),
                         ("llama3-llava-next-8b", "llama3"), ("llava-next-72b", "qwen"), ("llava-next-110b", "qwen")]:
        cfg = _compose([f"model={name}"])
        assert cfg.model.path.startswith("llava-hf/") and cfg.model.family == family


def test_wrong_type_fails_at_composition():
    with pytest.raises(Exception, match="trainer.max_steps|max_steps"):
        OmegaConf.to_object(_compose(["trainer.max_steps=lots"]))


def test_unknown_key_fails_at_composition():
    with pytest.raises(Exception, match="no_such_key"):
        _compose(["data.no_such_key=1"])


TOP_LEVEL = sorted(p.stem for p in Path(CONFIG_DIR).glob("*.yaml"))


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_every_subcommand_config_composes(name):
    """Each subcommand's YAML composes over its schema (required values may stay missing here)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=name)
    assert OmegaConf.to_container(cfg, resolve=False)
    assert {"train", "preview", "doctor", "eval", "export", "chat", "sweep-report"} <= set(TOP_LEVEL)
