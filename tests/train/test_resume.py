"""Resume and preemption on real runs: SIGKILL right after checkpoint 2, `trainer.resume=auto` continues with
the uninterrupted run's losses (a half-written checkpoint planted beside it is never picked); SIGTERM makes a
run save a loadable checkpoint and exit cleanly. Plus the checkpoint-picking rules without a model."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO, REPO
from llava_train.train.resume import SEAL, check_resume, latest_sealed, resolve_resume

TIMEOUT = 300
STEPS = 4

# Runs the recipe with one extra callback that sends a real signal to this process at a given point.
DRIVER = r"""
import os, signal, sys
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import TrainerCallback
from llava_train.cli import CONFIG_DIR
from llava_train.train.recipe import run

out, event, step, signame, *overrides = sys.argv[1:]

class Signal(TrainerCallback):
    def fire(self, state):
        if state.global_step == int(step):
            os.kill(os.getpid(), getattr(signal, signame))
    def on_save(self, args, state, control, **kw):
        if event == "save":
            self.fire(state)
    def on_step_end(self, args, state, control, **kw):
        if event == "step":
            self.fire(state)

with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
    cfg = OmegaConf.to_object(compose("train", overrides=overrides))
result = run(cfg, out, callbacks=[Signal()] if event != "none" else [])
print("RESULT", result.get("preempted", False), flush=True)
"""


def drive(out, event, step, signame, *overrides):
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(out), event, str(step), signame, *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    return proc


def common(data_root):
    return [f"data.train_path={DEMO / 'train.json'}", f"data.image_root={DEMO}", "data.eval_path=null",
            f"trainer.max_steps={STEPS}", "trainer.logging_steps=1", "trainer.save_steps=2",
            "trainer.per_device_train_batch_size=2", "trainer.disable_tqdm=true", "peft.dropout=0.0"]


def losses(folder):
    return dict((s, v) for s, v in json.loads((folder / "metrics.json").read_text())["loss_history"])


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("resume")
    args = common(root)
    ref = drive(root / "ref", "none", 0, "-", *args)
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = drive(root / "run", "save", 2, "SIGKILL", *args)
    # a half-written later checkpoint, as left by a kill during saving: no seal, a truncated file
    half = root / "run" / "checkpoint-3"
    shutil.copytree(root / "run" / "checkpoint-2", half)
    (half / SEAL).unlink()
    (half / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    resumed = subprocess.run([sys.executable, "-m", "llava_train", "train", f"output_dir={root}/run",
                              "trainer.resume=auto", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return root, killed, resumed


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_auto_matches(killed_and_resumed):
    root, killed, resumed = killed_and_resumed
    assert killed.returncode == -signal.SIGKILL  # really died by SIGKILL, after sealing checkpoint-2
    assert (root / "run" / "checkpoint-2" / SEAL).is_file()
    assert f"resuming from {root / 'run' / 'checkpoint-2'}" in resumed.stdout  # not the half-written one
    ref, got = losses(root / "ref"), losses(root / "run")
    assert sorted(got) == [3, 4]  # the resumed run trained steps 3..4 only
    for step in (3, 4):
        assert abs(ref[step] - got[step]) < 1e-5, (step, ref[step], got[step])
    assert (root / "run" / "final" / "adapter_model.safetensors").exists()
    assert (root / "run" / "checkpoint-4" / SEAL).is_file()


@pytest.mark.slow
def test_sigterm_saves_loadable_checkpoint_and_exits_cleanly(tmp_path, tiny_dir):
    from peft import PeftModel
    from transformers import LlavaNextForConditionalGeneration

    args = common(tmp_path) + ["trainer.max_steps=200", "trainer.save_steps=1000"]
    proc = drive(tmp_path / "run", "step", 2, "SIGTERM", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT True" in proc.stdout and "preempted: checkpoint saved" in proc.stdout
    # the signal arrived during step 2's callbacks: the run stops at the end of the next step
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert (ckpt / SEAL).is_file() and not (tmp_path / "run" / "final").exists()
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 3
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "adapter_model.safetensors"} <= set(os.listdir(ckpt))
    base = LlavaNextForConditionalGeneration.from_pretrained(str(tiny_dir))
    model = PeftModel.from_pretrained(base, str(ckpt))
    assert any("lora_B" in n for n, _ in model.named_parameters())
    assert resolve_resume("auto", tmp_path / "run") == str(ckpt)


def _fake_checkpoint(folder: Path, step: int, sealed: bool) -> Path:
    p = folder / f"checkpoint-{step}"
    p.mkdir(parents=True)
    (p / "trainer_state.json").write_text("{}")
    if sealed:
        (p / SEAL).write_text(json.dumps({"global_step": step}))
    return p


def test_auto_picks_newest_sealed_checkpoint(tmp_path):
    assert resolve_resume("auto", tmp_path) is None  # nothing yet: start fresh
    _fake_checkpoint(tmp_path, 2, True)
    ten = _fake_checkpoint(tmp_path, 10, True)
    _fake_checkpoint(tmp_path, 12, False)  # interrupted while writing
    assert latest_sealed(tmp_path) == ten
    assert resolve_resume("auto", tmp_path) == str(ten)
    assert resolve_resume("false", tmp_path) is None and resolve_resume("False", tmp_path) is None
    assert resolve_resume(str(ten), tmp_path) == str(ten)


def test_explicit_unsealed_or_missing_checkpoint_is_refused(tmp_path):
    half = _fake_checkpoint(tmp_path, 12, False)
    assert "not a complete checkpoint" in check_resume(str(half))[0]
    assert "not a folder" in check_resume(str(tmp_path / "nope"))[0]
    assert check_resume("auto") == [] and check_resume("false") == []


def test_unsealed_leftovers_removed_only_when_resuming(tmp_path):
    from llava_train.train.resume import drop_unsealed

    two = _fake_checkpoint(tmp_path, 2, True)
    _fake_checkpoint(tmp_path, 1, False)
    three = _fake_checkpoint(tmp_path, 3, False)
    assert drop_unsealed(tmp_path, None) == [] and three.exists()  # a fresh run touches nothing
    assert drop_unsealed(tmp_path, str(two)) == [three] and not three.exists()
    assert (tmp_path / "checkpoint-1").exists()  # older than the resume point: left alone
