"""The installable package: a wheel (not an editable checkout) carries configs/ and the demo data, and
its `llava` command trains the demo from any folder. The fresh venv sees this venv's dependencies
through a .pth line (so torch is not installed again) but not its editable llava-train."""

import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_wheel_trains_the_demo_from_another_folder(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(REPO)], check=True, timeout=300)
    (wheel,) = wheels.glob("llava_train-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"llava_train/_resources/configs/train.yaml", "llava_train/_resources/configs/experiment/demo.yaml",
            "llava_train/_resources/data/demo/train.json", "llava_train/_resources/data/demo/eval.json"} <= names
    assert any(n.startswith("llava_train/_resources/data/demo/images/") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # this venv's packages (torch, transformers...) as a plain path: its .pth files (the editable
    # llava-train finder among them) are not processed
    (venv / site.split(str(venv) + "/")[1] / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: this venv's llava-train metadata is visible through deps.pth
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", str(wheel)],
                   check=True, timeout=300)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run([str(py), "-c", "import llava_train.cli as c; print(c.__file__); print(c.CONFIG_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(w.startswith(str(venv)) for w in where), where  # the wheel's package and configs, not the checkout
    proc = subprocess.run([str(venv / "bin" / "llava"), "train", "trainer.max_steps=1", "trainer.disable_tqdm=true",
                           "eval.enabled=false", "output_dir=run"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the packaged demo data, train and eval split (generation eval skipped to keep the test short)
    assert f"samples from {venv}" in proc.stdout and "_resources/data/demo/train.json" in proc.stdout
    assert "_resources/data/demo/eval.json" in proc.stdout
    assert (elsewhere / "run" / "final" / "adapter_model.safetensors").exists()
    assert (elsewhere / "run" / "metrics.json").exists()
