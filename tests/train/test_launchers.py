"""`llava train` launched as users launch it, without our launch/ scripts: plain `deepspeed --module`
(which passes `--local_rank=N` to every rank) and `accelerate launch --multi_gpu -m` (2 CPU ranks, gloo).
Both run the same 2-step job with sequential data order: each is a real 2-rank run, and their losses agree."""

import json
import sys
from pathlib import Path

import pytest
from test_distributed import free_port, launch

from conftest import DEMO

pytestmark = pytest.mark.slow

STEPS = 2


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("launchers")
    data = root / "small.json"
    data.write_text(json.dumps(json.loads((DEMO / "train.json").read_text())[:8]))
    overrides = [f"data.train_path={data}", f"data.image_root={DEMO}", "data.eval_path=null",
                 f"trainer.max_steps={STEPS}", "trainer.logging_steps=1", "trainer.per_device_train_batch_size=1",
                 "trainer.data_order=sequential", "data.group_by_length=false", "data.group_by_modality=false",
                 "trainer.disable_tqdm=true", "trainer.save_steps=100"]
    return root, overrides


def _check(root: Path, log: str) -> list:
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["world_size"] == 2, log[-3000:]
    assert [s for s, _ in metrics["loss_history"]] == list(range(1, STEPS + 1))
    assert (root / "final" / "adapter_model.safetensors").exists()
    assert log.count("train: 8 samples") == 1  # rank 0 prints
    return [loss for _, loss in metrics["loss_history"]]


@pytest.fixture(scope="module")
def deepspeed_losses(job):
    root, overrides = job
    bin_dir = Path(sys.executable).parent
    log = launch([str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", free_port(), "--module",
                  "llava_train", "train", f"output_dir={root}/ds", "deepspeed=zero2", *overrides],
                 env={"OMP_NUM_THREADS": "1"})
    assert "--local_rank=1" in log or "local_rank=1" in log  # the launcher did pass it
    return _check(root / "ds", log)


def test_plain_deepspeed_module_launch(deepspeed_losses):
    assert all(loss > 0 for loss in deepspeed_losses)


def test_accelerate_launch_multi_gpu(job, deepspeed_losses):
    root, overrides = job
    bin_dir = Path(sys.executable).parent
    log = launch([str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
                  "-m", "llava_train", "train", f"output_dir={root}/acc", *overrides], env={"OMP_NUM_THREADS": "1"})
    losses = _check(root / "acc", log)
    assert losses == pytest.approx(deepspeed_losses, abs=1e-3)  # same global batches: same losses
