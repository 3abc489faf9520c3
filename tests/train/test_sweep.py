"""A local `llava train -m` sweep over two learning rates runs both jobs, each in its own folder, and
`llava sweep-report DIR` tabulates them (overrides, final loss, eval accuracy, throughput) with a plot."""

import csv
import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import DEMO, REPO
from llava_train.cli import CONFIG_DIR
from llava_train.config import SweepReportConfig


def _llava(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "llava_train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_local_sweep_and_report(tmp_path, tiny_dir):
    evals = json.loads((DEMO / "eval.json").read_text())[:4]
    (tmp_path / "eval.json").write_text(json.dumps(evals))
    sweep = tmp_path / "sweep"
    _llava("train", "-m", "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}", f"data.train_path={DEMO / 'train.json'}",
           f"data.eval_path={tmp_path / 'eval.json'}", f"data.image_root={DEMO}", "trainer.max_steps=3",
           "trainer.per_device_train_batch_size=2", "trainer.logging_steps=1", "trainer.disable_tqdm=true",
           "eval.max_new_tokens=3")
    for job in ("0", "1"):  # each run in its own folder
        assert (sweep / job / "metrics.json").is_file() and (sweep / job / "final").is_dir()
    stdout = _llava("sweep-report", str(sweep))
    assert "optim.lr=0.001" in stdout and "optim.lr=0.002" in stdout
    with open(sweep / "sweep_report.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["overrides"] for r in table] == ["optim.lr=0.001", "optim.lr=0.002"]  # only what varies
    for row, job in zip(table, ("0", "1")):
        m = json.loads((sweep / job / "metrics.json").read_text())
        assert row["status"] == "done"
        assert float(row["final_loss"]) == pytest.approx(m["train_loss"])
        assert float(row["eval_accuracy"]) == pytest.approx(m["eval_accuracy"])
        assert float(row["samples_per_s"]) > 0
    assert float(table[0]["final_loss"]) != float(table[1]["final_loss"])  # the two learning rates differ
    png = (sweep / "sweep_report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "| run | overrides |" in (sweep / "sweep_report.md").read_text()


def test_sweep_report_lists_failed_runs(tmp_path):
    from llava_train.train.sweep import report

    for job, lr in (("0", "1e-3"), ("1", "2e-3")):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- optim.lr={lr}\n- trainer.max_steps=3\n")
    (tmp_path / "0" / "metrics.json").write_text(json.dumps(
        {"train_loss": 1.5, "eval_accuracy": 0.5, "train_samples_per_second": 3.0, "train_seconds": 2.0,
         "loss_history": [[1, 2.0], [2, 1.5]]}))
    paths = report(str(tmp_path))
    rows = list(csv.DictReader(open(paths["csv"])))
    assert rows[0]["final_loss"] == "1.5" and rows[0]["overrides"] == "optim.lr=1e-3"
    assert rows[1]["status"].startswith("no metrics") and rows[1]["final_loss"] == ""
    assert paths["png"].stat().st_size > 0


def test_sweep_report_config_composes():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("sweep-report", overrides=["dir=somewhere"])
    job = OmegaConf.to_object(cfg)
    assert isinstance(job, SweepReportConfig) and job.dir == "somewhere" and job.out == ""


def test_slurm_launcher_config_composes():
    """`hydra/launcher=slurm` (submitit) composes: `llava train -m hydra/launcher=slurm` submits SLURM jobs."""
    out = _llava("train", "hydra/launcher=slurm", "--cfg", "hydra", timeout=120)
    launcher = OmegaConf.create(out).hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node  # one task per GPU
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0  # requeue after preemption
