"""The demo is one explicit choice (`experiment=demo`), the default only while the command line names no
model and no data: naming either leaves nothing of the demo (eval set, max_length, optimizer, step budget)."""

import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO
from llava_train.cli import CONFIG_DIR, strip_local_rank
from llava_train.config import TrainJobConfig
from llava_train.config.demo import demo_overrides
from llava_train.resources import DEMO_DATA

DEFAULTS = TrainJobConfig()


def job(command: str, overrides: list[str]):
    """What `llava <command> OVERRIDES` composes (the CLI applies the same demo rule)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train" if command == "plan" else command, overrides=demo_overrides(command, overrides))
    return OmegaConf.to_object(cfg)


def demo_free(cfg) -> None:
    """Nothing of the demo: its data, eval set, max_length, optimizer and step budget are all gone."""
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    assert str(DEMO_DATA) not in text and "data/demo" not in text
    assert cfg.data.eval_path is None and cfg.data.max_length != 512
    assert (cfg.optim.lr, cfg.optim.projector_lr) == (DEFAULTS.optim.lr, DEFAULTS.optim.projector_lr)
    assert cfg.trainer.max_steps == DEFAULTS.trainer.max_steps
    assert cfg.trainer.per_device_train_batch_size == DEFAULTS.trainer.per_device_train_batch_size


def test_no_arguments_is_the_demo():
    cfg = job("train", [])
    assert cfg.model.path == "tiny" and cfg.model.modules_to_save == ["lm_head", "embed_tokens"]
    assert cfg.data.train_path == str(DEMO_DATA / "train.json") and cfg.data.eval_path == str(DEMO_DATA / "eval.json")
    assert cfg.data.max_length == 512 and cfg.peft.method == "lora"
    assert (cfg.optim.lr, cfg.optim.projector_lr) == (2e-3, 1e-2)
    assert (cfg.trainer.max_steps, cfg.trainer.per_device_train_batch_size, cfg.trainer.logging_steps) == (400, 16, 20)


@pytest.mark.parametrize("overrides", [
    ["model=tiny"], ["trainer.max_steps=5"], ["output_dir=x", "optim.lr=1e-3"], ["data.eval_path=e.json"]])
def test_the_demo_stays_without_model_or_data(overrides):
    cfg = job("train", overrides)
    assert cfg.data.train_path == str(DEMO_DATA / "train.json") and cfg.data.max_length == 512


def test_naming_a_real_model_drops_the_demo():
    """The issue's command: `--cfg job` showed max_length 512, the demo eval set, batch 8, no checkpointing."""
    cfg = job("train", ["model=llava-v1.6-mistral-7b", "data.train_path=/data/mix.json",
                        "data.image_root=/data/images"])
    demo_free(cfg)
    assert cfg.model.path == "llava-hf/llava-v1.6-mistral-7b-hf" and cfg.model.modules_to_save == []
    assert cfg.data.train_path == "/data/mix.json" and cfg.data.max_length == 4096
    assert cfg.trainer.gradient_checkpointing and cfg.model.dtype == "bf16" and cfg.model.attn_implementation == "auto"
    assert cfg.data.num_workers > 0 and cfg.data.pad_to_multiple_of == 8
    # a model alone, and a local folder of the tiny geometry's group, also drop it
    demo_free(job("train", ["model=llava-v1.6-34b"]))
    demo_free(job("train", ["model.path=/models/my-llava"]))


def test_giving_data_drops_the_demo():
    cfg = job("train", ["data.train_path=/data/mix.json"])
    demo_free(cfg)
    assert cfg.model.path == "tiny" and cfg.data.max_length == DEFAULTS.data.max_length


def test_sources_alone_replace_train_path():
    cfg = job("train", ["data.sources=[{path: /d/a.parquet, weight: 2.0}, {path: /d/b.json}]"])
    demo_free(cfg)
    assert cfg.data.train_path == "" and [s.path for s in cfg.data.sources] == ["/d/a.parquet", "/d/b.json"]


def test_an_explicit_experiment_is_kept():
    cfg = job("train", ["experiment=demo_full"])
    assert cfg.peft.method == "full" and cfg.data.max_length == 512 and cfg.optim.lr == 1e-3
    cfg = job("train", ["experiment=mistral-7b-lora-1x80gb", "data.train_path=/d/x.json"])
    # its own recipe, nothing of the demo's
    assert cfg.data.eval_path is None and cfg.optim.lr == 2e-4 and cfg.trainer.max_steps == -1


@pytest.mark.parametrize("command", ["doctor", "preview"])
def test_inspection_drops_demo_data_when_given_data(command):
    assert job(command, []).data.eval_path == str(DEMO_DATA / "eval.json")
    cfg = job(command, ["data.train_path=/data/mix.json", "data.image_root=/data/images"])
    assert cfg.data.eval_path is None and cfg.data.train_path == "/data/mix.json" and cfg.data.max_length != 512
    # a model does not drop the demo data there (previewing it in another prompt format)
    assert job(command, ["model.path=llava-hf/llava-v1.6-34b-hf"]).data.train_path.endswith("demo/train.json")


def test_cli_cfg_job_shows_no_demo_for_a_real_run():
    out = subprocess.run([sys.executable, "-m", "llava_train", "train", "--cfg", "job", "model=llava-v1.6-mistral-7b",
                          "data.train_path=/data/mix.json", "data.image_root=/data/images"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = yaml.safe_load(out.stdout)
    assert cfg["data"]["max_length"] == 4096 and cfg["data"]["eval_path"] is None
    assert cfg["trainer"]["gradient_checkpointing"] is True and "demo" not in out.stdout


def test_deepspeed_local_rank_argument_is_accepted(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "")  # recorded, so the test leaves the environment as it found it
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_local_rank(["--local_rank=1", "train", "a=1"]) == ["train", "a=1"]
    import os

    assert os.environ["LOCAL_RANK"] == "1"
    monkeypatch.setenv("LOCAL_RANK", "3")  # the launcher's environment wins
    assert strip_local_rank(["train", "--local_rank", "0", "b=2"]) == ["train", "b=2"]
    assert os.environ["LOCAL_RANK"] == "3"
    out = subprocess.run([sys.executable, "-m", "llava_train", "--local_rank=0", "train", "--cfg", "job"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
