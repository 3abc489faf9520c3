"""The `llava` CLI: subcommand dispatch, Hydra's --cfg/--help/-m on each subcommand."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import DEMO, REPO


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "llava_train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_usage_lists_commands():
    out = _run("--help")
    assert out.returncode == 0 and "train" in out.stdout


def test_unknown_command_fails():
    out = _run("trian")
    assert out.returncode == 2 and "unknown command 'trian'" in out.stderr


def test_cfg_job_shows_composed_config():
    out = _run("train", "--cfg", "job", "model=llava-v1.6-vicuna-7b", "optim.lr=1e-5")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["model"]["path"] == "llava-hf/llava-v1.6-vicuna-7b-hf" and cfg["model"]["family"] == "vicuna"
    assert cfg["optim"]["lr"] == 1e-5


def test_hydra_help():
    out = _run("train", "--help")
    assert out.returncode == 0 and "model: " in out.stdout and "peft" in out.stdout


def test_bad_override_is_reported():
    out = _run("train", "--cfg", "job", "trainer.max_steps=many")
    assert out.returncode != 0 and "max_steps" in out.stderr


@pytest.mark.slow
def test_multirun_gives_each_job_its_folder(tmp_path):
    evals = tmp_path / "eval.json"
    evals.write_text(json.dumps(json.loads((DEMO / "eval.json").read_text())[:2]))
    out = _run("train", "-m", "optim.lr=1e-3,2e-3", "trainer.max_steps=2", "trainer.disable_tqdm=true",
               f"hydra.sweep.dir={tmp_path}/sweep", f"data.eval_path={evals}", f"data.image_root={DEMO}")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "final" / "adapter_config.json").exists()
        assert (tmp_path / "sweep" / job / "metrics.json").exists()
