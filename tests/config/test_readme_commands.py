"""Every command the README's "Training a real checkpoint" section shows composes to a real run: no demo
path, data.max_length at least the checkpoint's largest image, gradient checkpointing on. Together they
name every real model, every hardware recipe and every launcher."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO
from llava_train.cli import CONFIG_DIR
from llava_train.config import TrainJobConfig
from llava_train.config.demo import demo_overrides
from llava_train.model.catalog import KNOWN, geometry, largest_image_tokens
from llava_train.model.load import checkpoint_config
from llava_train.resources import DEMO_DATA

SECTION = "## Training a real checkpoint"
LAUNCHERS = {"llava": "llava", "torchrun": "torchrun", "deepspeed": "deepspeed", "accelerate": "accelerate",
             "launch/torchrun.sh": "launch/torchrun.sh", "launch/deepspeed.sh": "launch/deepspeed.sh"}


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", len(SECTION))]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def parse(command: str) -> tuple[str, str, list[str]]:
    """(launcher, subcommand, hydra overrides) of one command line."""
    words = shlex.split(command)
    while "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
        words.pop(0)
    launcher = words[0]
    if launcher in ("launch/torchrun.sh", "launch/deepspeed.sh"):
        return launcher, "train", words[1:]
    for k, w in enumerate(words):
        if w in ("train", "plan") and k > 0 and words[k - 1] in ("llava", "llava_train"):
            return launcher, w, [a for a in words[k + 1:] if not a.startswith("-") and a != "job"]
    raise AssertionError(f"cannot read {command!r}")


COMMANDS = readme_commands()


def _user_config_dir(command: str, tmp_path: Path):
    """The README's --config-dir line through the CLI, with a user folder holding one experiment."""
    words = shlex.split(command)
    folder = tmp_path / words[words.index("--config-dir") + 1]
    (folder / "experiment").mkdir(parents=True)
    (folder / "experiment" / "my-run.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: llava-v1.6-mistral-7b\n\noptim:\n  lr: 1e-5\n")
    args = [str(folder) if w == folder.name else w for w in words[2:]]
    out = subprocess.run([sys.executable, "-m", "llava_train", "train", *args, "--cfg", "job"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainJobConfig), yaml.safe_load(out.stdout)))


def _compose(sub, overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=demo_overrides(sub, overrides)))


def test_the_section_names_every_model_recipe_and_launcher():
    text = " ".join(COMMANDS)
    models = {p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml")} - {"tiny"}
    recipes = {p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml")} - {"demo", "demo_full"}
    assert all(f"model={m} " in text for m in models), models
    assert all(f"experiment={r} " in text for r in recipes), recipes
    assert {parse(c)[0] for c in COMMANDS} >= set(LAUNCHERS)


@pytest.mark.parametrize("command", COMMANDS, ids=[c[:90] for c in COMMANDS])
def test_readme_command_composes_to_a_real_run(command, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, sub, overrides = parse(command)
    if "--config-dir" in command:
        cfg = _user_config_dir(command, tmp_path)
        assert cfg.optim.lr == 1e-5  # the user's experiment, found beside ours
    else:
        cfg = _compose(sub, overrides)
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    assert str(DEMO_DATA) not in text and "data/demo" not in text, command
    assert cfg.model.path != "tiny" and cfg.model.dtype == "bf16"
    # a local copy (model.path=/models/...) has the geometry of the checkpoint its group names
    released = cfg.model.path if cfg.model.path in KNOWN else _compose(
        sub, [o for o in overrides if not o.startswith("model.path=")]).model.path
    assert cfg.data.max_length >= largest_image_tokens(geometry(checkpoint_config(released)))
    assert cfg.trainer.gradient_checkpointing
    assert cfg.data.eval_path in (None, "/data/my_eval.json")
