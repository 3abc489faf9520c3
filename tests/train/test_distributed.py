"""Real 2-rank CPU runs (gloo): DDP under torchrun, ZeRO-2, ZeRO-3 and ZeRO-3 with CPU offload under the
DeepSpeed launcher, each started through launch/*.sh, against a 1-rank run with the same global batch (2),
sequential data order, fp32, dropout 0; QLoRA under ZeRO-3 against 1-rank QLoRA; kill + resume under 2 ranks.
Every other sample is text-only, so with per-device batch 1 rank 1 never sees an image: the ZeRO-3 runs
finishing is the text-only no-hang test. The launches are shared by all tests here."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEMO, REPO
from llava_train.train.distributed import SHM

pytestmark = pytest.mark.slow

STEPS = 4
TIMEOUT = 420  # seconds per launch; a hang fails the test instead of blocking CI


def launch(cmd, env=None, timeout=TIMEOUT, returncode=0):
    """Run a launcher in its own process group; on timeout kill the whole group (ranks included)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[:3]} did not finish within {timeout} s (hang?):\n{out[-4000:]}")
    assert proc.returncode == returncode, out[-6000:]
    return out


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def mixed_dataset(folder: Path) -> Path:
    """16 demo samples; odd positions made text-only (no image, no <image> in the question)."""
    records = json.loads((DEMO / "train.json").read_text())[:16]
    for i, r in enumerate(records):
        if i % 2:
            r.pop("image")
            r["conversations"][0]["value"] = r["conversations"][0]["value"].replace("<image>\n", "")
    path = folder / "mixed.json"
    path.write_text(json.dumps(records))
    return path


def eval_subset(folder: Path, n: int = 3) -> Path:
    path = folder / "eval.json"
    path.write_text(json.dumps(json.loads((DEMO / "eval.json").read_text())[:n]))
    return path


def common_overrides(data: Path, eval_path=None) -> list[str]:
    return [f"data.train_path={data}", f"data.image_root={DEMO}", f"data.eval_path={eval_path or 'null'}",
            f"trainer.max_steps={STEPS}", "trainer.logging_steps=1", "trainer.data_order=sequential",
            "data.group_by_length=false", "data.group_by_modality=false", "trainer.disable_tqdm=true",
            "model.dtype=fp32", "peft.dropout=0.0", "data.num_workers=0"]  # workers: tests/train/test_faults.py


def deepspeed_env() -> dict:
    return {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "NUM_GPUS": "2", "MASTER_PORT": free_port(),
            "DEEPSPEED": str(Path(sys.executable).parent / "deepspeed")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("dist")
    shm_before = set(SHM.glob("deepspeed_allreduce_buffer_*"))
    data = mixed_dataset(root)
    common = [*common_overrides(data), f"trainer.save_steps={STEPS}"]
    env = {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    logs = {}
    one = ["trainer.per_device_train_batch_size=2", *common]
    logs["single"] = launch([sys.executable, "-m", "llava_train", "train", f"output_dir={root}/single", *one])
    two = ["trainer.per_device_train_batch_size=1", *common]
    logs["ddp"] = launch(["bash", "launch/torchrun.sh", f"output_dir={root}/ddp", "deepspeed=none", *two],
                         env={**env, "NPROC_PER_NODE": "2", "MASTER_PORT": free_port()})
    # the ZeRO-3 run is also a full `llava train` with the in-training generation eval (every 2 steps)
    two_eval = ["trainer.per_device_train_batch_size=1", *common_overrides(data, eval_subset(root)),
                f"trainer.save_steps={STEPS}", "eval.every_steps=2", "eval.batch_size=2"]
    stages = {"zero2": ["deepspeed=zero2", *two], "zero3": ["deepspeed=zero3", *two_eval],
              "zero3_offload": ["deepspeed=zero3_offload", *two]}
    for name, overrides in stages.items():
        logs[name] = launch(["bash", "launch/deepspeed.sh", f"output_dir={root}/{name}", *overrides],
                            env=deepspeed_env())
    # QLoRA: 1 rank vs ZeRO-3 on 2 ranks, every 4-bit weight sharded (persistence threshold 0: the tiny
    # model's attention weights would otherwise stay whole as "small")
    logs["qlora_single"] = launch([sys.executable, "-m", "llava_train", "train", f"output_dir={root}/qlora_single",
                                   "peft=qlora", *one])
    logs["qlora_zero3"] = launch(["bash", "launch/deepspeed.sh", f"output_dir={root}/qlora_zero3", "peft=qlora",
                                  "deepspeed=zero3", "deepspeed.param_persistence_threshold=0", *two],
                                 env=deepspeed_env())
    logs["shm_left"] = sorted(str(p) for p in set(SHM.glob("deepspeed_allreduce_buffer_*")) - shm_before)
    return root, logs, data


def metrics(root, name):
    return json.loads((root / name / "metrics.json").read_text())


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3", "zero3_offload"])
def test_two_rank_losses_equal_one_rank(runs, name):
    root, _, _ = runs
    ref, got = metrics(root, "single"), metrics(root, name)
    assert got["world_size"] == 2 and ref["world_size"] == 1
    assert [s for s, _ in got["loss_history"]] == list(range(1, STEPS + 1))
    for (step, a), (_, b) in zip(ref["loss_history"], got["loss_history"]):
        assert abs(a - b) < 1e-3, (name, step, a, b)
    # training moved: the comparison is not between untrained models
    assert ref["loss_history"][-1][1] != ref["loss_history"][0][1]


def test_deepspeed_ran_with_partitioned_state(runs):
    root, _, _ = runs
    for stage in ("zero2", "zero3", "zero3_offload", "qlora_zero3"):
        ds = root / stage / f"checkpoint-{STEPS}" / f"global_step{STEPS}"
        names = {p.name for p in ds.iterdir()}
        assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= names
    assert not list((root / "ddp" / f"checkpoint-{STEPS}").glob("global_step*"))  # plain DDP: no DeepSpeed
    assert (root / "ddp" / f"checkpoint-{STEPS}" / "rng_state_1.pth").exists()  # a checkpoint holds every rank


def test_saved_adapters_nonempty_and_equal(runs):
    root, _, _ = runs
    adapters = {n: load_file(str(root / n / "final" / "adapter_model.safetensors"))
                for n in ("single", "ddp", "zero2", "zero3", "zero3_offload")}
    ref = adapters["single"]
    assert any("lora_B" in k for k in ref) and any("multi_modal_projector" in k for k in ref)
    for name, tensors in adapters.items():
        assert tensors.keys() == ref.keys(), name
        for k, t in tensors.items():
            assert t.numel() > 0 and t.shape == ref[k].shape, (name, k, t.shape)  # the ZeRO-3 empty-adapter bug
            assert torch.allclose(t.float(), ref[k].float(), atol=1e-4, rtol=1e-3), (name, k)
        assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k), name  # LoRA B trained


def test_zero3_text_only_rank_finishes(runs):
    """Rank 1's every batch is text-only (sequential order, per-device batch 1): it must not hang ZeRO-3."""
    root, logs, data = runs
    records = json.loads(Path(data).read_text())
    rank1 = records[1::2][:STEPS]
    assert all("image" not in r for r in rank1) and all("image" in r for r in records[0::2][:STEPS])
    assert metrics(root, "zero3")["loss_history"][-1][0] == STEPS
    assert (root / "zero3" / "final" / "adapter_model.safetensors").exists()


def test_deepspeed_runs_leave_no_shared_memory_behind(runs):
    """DeepSpeed's CPU all-reduce buffers (69 MB per rank in /dev/shm) are unlinked at exit
    (train/distributed.py::release_deepspeed_shm); 4 DeepSpeed runs here left 8 before."""
    _, logs, _ = runs
    assert logs["shm_left"] == []


def test_rank0_only_output(runs):
    _, logs, _ = runs
    for name in ("ddp", "zero2", "zero3", "zero3_offload", "qlora_zero3"):
        assert logs[name].count("train: 16 samples") == 1, name  # printed by rank 0 only


def test_zero3_offload_steps_with_deepspeed_cpu_adam(runs):
    """deepspeed=zero3_offload: optimizer state and parameters on the CPU, stepped by DeepSpeed's compiled
    CPU Adam over the same per-module parameter groups (its losses equal ZeRO-3's: the test above)."""
    root, logs, _ = runs
    assert "optimizer: DeepSpeedCPUAdam" in logs["zero3_offload"]
    assert "optimizer: AdamW" in logs["zero3"]
    ref, got = metrics(root, "zero3"), metrics(root, "zero3_offload")
    for (step, a), (_, b) in zip(ref["loss_history"], got["loss_history"]):
        assert abs(a - b) < 1e-3, (step, a, b)


def test_zero3_full_run_with_in_training_generation_eval(runs):
    """A full 2-rank ZeRO-3 `llava train`: eval loss and generation accuracy logged at steps 2 and 4 (every
    rank generating its shard of the eval set), then the final eval."""
    root, _, _ = runs
    rows = [json.loads(line) for line in (root / "zero3" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_accuracy" in r and not r.get("final")]
    assert [r["step"] for r in evals] == [2, 4], rows
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in evals)
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    final = metrics(root, "zero3")
    assert final["eval_count"] == 3 and 0.0 <= final["eval_accuracy"] <= 1.0
    assert len((root / "zero3" / "predictions.jsonl").read_text().splitlines()) == 3


def test_qlora_zero3_shards_4bit_weights_and_matches_one_rank(runs):
    """QLoRA under ZeRO-3: packed 4-bit weights stored in the model dtype (quant_storage=auto) and partitioned
    across both ranks; per-step losses equal 1-rank QLoRA's; the gathered adapter (projector included) is
    non-empty and equal to the 1-rank one."""
    root, logs, _ = runs
    log = logs["qlora_zero3"]
    assert "quantised: language_model: 14 x 4bit" in log  # the base really is 4-bit
    assert "vision_tower=float32" in log and "projector=float32" in log and "lm_head=float32" in log
    assert "language_model=float32," in log  # packed in fp32 storage, not uint8
    assert "uint8" in logs["qlora_single"]  # 1 rank: auto keeps uint8 storage
    four = metrics(root, "qlora_zero3")["zero3_shards_rank0"]["4bit"]
    assert four["sharded"] == four["tensors"] == 14
    assert four["local_bytes"] * 2 == four["bytes"]  # rank 0 holds half of the packed weights
    assert four["quant_state_bytes"] > 0
    ref, got = metrics(root, "qlora_single"), metrics(root, "qlora_zero3")
    assert got["world_size"] == 2 and [s for s, _ in got["loss_history"]] == list(range(1, STEPS + 1))
    for (step, a), (_, b) in zip(ref["loss_history"], got["loss_history"]):
        assert abs(a - b) < 1e-3, (step, a, b)
    assert ref["loss_history"][-1][1] != ref["loss_history"][0][1]
    a = load_file(str(root / "qlora_single" / "final" / "adapter_model.safetensors"))
    b = load_file(str(root / "qlora_zero3" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("lora_B" in k for k in a) and any("multi_modal_projector" in k for k in a)
    for k, t in b.items():
        assert t.numel() > 0 and t.shape == a[k].shape, k
        assert torch.allclose(t.float(), a[k].float(), atol=1e-4, rtol=1e-3), k
    assert any(t.abs().sum() > 0 for k, t in b.items() if "lora_B" in k)


@pytest.fixture(scope="module")
def killed_and_resumed(runs):
    """ZeRO-2 and ZeRO-3: SIGKILL of every process once checkpoint 2 is sealed, then `trainer.resume=auto`."""
    root, _, data = runs
    worker = Path(__file__).with_name("kill_worker.py")
    out = {}
    for stage in ("zero2", "zero3"):
        folder = root / f"{stage}_killed"
        overrides = [f"deepspeed={stage}", "trainer.per_device_train_batch_size=1", *common_overrides(data),
                     "trainer.save_steps=2"]
        env = deepspeed_env()
        killed = launch([env["DEEPSPEED"], "--num_gpus", "2", "--master_port", env["MASTER_PORT"], "--no_local_rank",
                         str(worker), "2", str(folder), *overrides], env=env, returncode=-signal.SIGKILL)
        assert not (folder / "final").exists() and not (folder / "checkpoint-4").exists()  # died mid-run
        for buffer in SHM.glob(f"deepspeed_allreduce_buffer_*_{env['MASTER_PORT']}_*"):
            buffer.unlink()  # a SIGKILLed rank cannot release its DeepSpeed buffer (train/distributed.py)
        resumed = launch(["bash", "launch/deepspeed.sh", f"output_dir={folder}", "trainer.resume=auto", *overrides],
                         env=deepspeed_env())
        out[stage] = (folder, killed, resumed)
    return root, out


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_rank_kill_then_resume_auto_matches_uninterrupted(killed_and_resumed, stage):
    root, out = killed_and_resumed
    folder, killed, resumed = out[stage]
    assert (folder / "checkpoint-2" / "llava_checkpoint_complete.json").is_file()
    assert f"resuming from {folder / 'checkpoint-2'}" in resumed
    ds = folder / "checkpoint-2" / "global_step2"
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= {
        p.name for p in ds.iterdir()}
    got = metrics(root, folder.name)
    ref = dict(metrics(root, stage)["loss_history"])  # the uninterrupted 2-rank run
    # one history across the kill: steps 1-2 from the checkpoint's log history, 3-4 trained after the resume
    assert [s for s, _ in got["loss_history"]] == [1, 2, 3, 4]
    for step, loss in got["loss_history"]:
        assert abs(ref[step] - loss) < 1e-5, (stage, step, ref[step], loss)
    assert (folder / "final" / "adapter_model.safetensors").exists()
