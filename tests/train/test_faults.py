"""Fault injection on real runs of the tiny model (real processes, real signals): an output folder holding
another run is refused; a run killed while writing a checkpoint resumes from a complete checkpoint of its own
(never the half-written one, a truncated one or another run's), with a history equal to an uninterrupted
run's; SIGTERM to the whole process group with two DataLoader workers saves a complete checkpoint and exits
0 (1 rank, 2 ranks through launch/torchrun.sh, and streaming data); a second live run in a folder is
refused; an export into its own source is refused with nothing deleted."""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO, REPO
from llava_train.files import file_sizes
from llava_train.train.identity import LOCK_FILE, RUN_FILE, STAGING, RunIdentity
from llava_train.train.resume import SEAL, is_complete, read_seal

pytestmark = pytest.mark.slow

TIMEOUT = 300
STEPS = 4
COMMON = [f"data.train_path={DEMO / 'train.json'}", f"data.image_root={DEMO}", "data.eval_path=null",
          f"trainer.max_steps={STEPS}", "trainer.logging_steps=1", "trainer.save_steps=2",
          "trainer.save_total_limit=null", "trainer.per_device_train_batch_size=2", "trainer.disable_tqdm=true",
          "peft.dropout=0.0"]
ENV = {"OMP_NUM_THREADS": "1"}
ENDLESS = 10**6  # steps of a run that only a signal ends (TIMEOUT fails the test if it does not)

# The recipe, SIGKILLed while HF writes the optimizer state of checkpoint-<kill_step> (after the adapter).
KILLED_WHILE_SAVING = r"""
import logging, os, signal, sys
from pathlib import Path
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import Trainer
from llava_train.cli import CONFIG_DIR
from llava_train.config.demo import demo_overrides
from llava_train.train.recipe import run

out, kill_step, *overrides = sys.argv[1:]
save_optimizer = Trainer._save_optimizer_and_scheduler

def dying_save(self, output_dir):
    if self.state.global_step == int(kill_step):
        Path(output_dir, "optimizer.pt").write_bytes(b"")  # the file being written when the kill comes
        os.kill(os.getpid(), signal.SIGKILL)
    return save_optimizer(self, output_dir)

Trainer._save_optimizer_and_scheduler = dying_save
logging.basicConfig(level=logging.INFO, stream=sys.stdout)  # the console the CLI's Hydra logging gives
with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
    cfg = OmegaConf.to_object(compose("train", overrides=demo_overrides("train", overrides)))  # as the CLI
run(cfg, out)
"""


def train(out, *overrides):
    return subprocess.run([sys.executable, "-m", "llava_train", "train", f"output_dir={out}", *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, **ENV})


def losses(folder):
    return json.loads((folder / "metrics.json").read_text())["loss_history"]


def snapshot(folder: Path) -> dict[str, int]:
    return file_sizes(folder)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dir):
    """An uninterrupted run."""
    root = tmp_path_factory.mktemp("faults")
    ref = train(root / "ref", *COMMON)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    return root


def test_folder_of_another_run_is_refused_up_front(reference):
    ref = reference / "ref"
    before = snapshot(ref)
    proc = train(ref, *COMMON, "optim.lr=1e-3")
    assert proc.returncode != 0
    err = proc.stderr
    assert "holds run" in err and "optim.lr: " in err and " -> 0.001" in err  # names the run and what differs
    for choice in ("trainer.resume=auto", "output_dir=<another folder>", "trainer.overwrite_output_dir=true"):
        assert choice in err
    assert "base checkpoint" not in proc.stdout  # refused before anything loaded
    def run_files(sizes):  # not this attempt's Hydra config and log, nor the lock it took and released
        return {k: v for k, v in sizes.items() if not k.startswith((".hydra", LOCK_FILE)) and not k.endswith(".log")}

    assert run_files(snapshot(ref)) == run_files(before)


def test_finished_run_rerun_with_resume_auto_does_nothing(reference):
    ref = reference / "ref"
    before = snapshot(ref / "final")
    proc = train(ref, *COMMON, "trainer.resume=auto")  # e.g. a requeued job after the run finished
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "has already finished: nothing to do" in proc.stdout
    assert snapshot(ref / "final") == before


@pytest.fixture(scope="module")
def killed_and_resumed(reference):
    """The reference run copied to K (the same run); started again there with overwrite_output_dir=true (the
    old one is moved aside), SIGKILLed while writing checkpoint-4; then beside its complete checkpoint-2:
    another run's complete checkpoint-3 and a truncated copy as checkpoint-5; then resume=auto."""
    root = reference
    k = root / "k"
    shutil.copytree(root / "ref", k)
    old_id = RunIdentity.read(k).run_id
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, str(k), str(STEPS), *COMMON,
                             "trainer.overwrite_output_dir=true"], cwd=REPO, capture_output=True, text=True,
                            timeout=TIMEOUT, env={**os.environ, **ENV})
    new_id = RunIdentity.read(k).run_id
    after_kill = {"staging": snapshot(k / STAGING), "checkpoints": sorted(p.name for p in k.glob("checkpoint-*"))}
    shutil.copytree(root / "ref" / "checkpoint-4", k / "checkpoint-3")  # complete, but of the old run
    shutil.copytree(k / "checkpoint-2", k / "checkpoint-5")
    with open(k / "checkpoint-5" / "optimizer.pt", "r+b") as f:  # this run's, but truncated
        f.truncate(100)
    resumed = train(k, *COMMON, "trainer.resume=auto")
    return root, k, killed, resumed, old_id, new_id, after_kill


def test_kill_while_writing_checkpoint_leaves_only_complete_ones(killed_and_resumed):
    root, k, killed, resumed, old_id, new_id, after_kill = killed_and_resumed
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert new_id != old_id
    # the old run was moved aside whole, its checkpoints intact (never rewritten in place)
    aside = Path(f"{k}.{old_id}")
    assert f"moved it to {aside}" in killed.stdout
    assert snapshot(aside / "checkpoint-4") == snapshot(root / "ref" / "checkpoint-4")
    assert is_complete(aside / "checkpoint-4")[0] and (aside / "final").is_dir()
    # the kill came while checkpoint-4 was in its staging folder: it never appeared as a checkpoint
    assert after_kill["checkpoints"] == ["checkpoint-2"]
    assert after_kill["staging"]["checkpoint-4/optimizer.pt"] == 0
    assert "checkpoint-4/adapter_model.safetensors" in after_kill["staging"]  # written before the kill
    assert not is_complete(k / "checkpoint-5")[0] and "differ from its seal" in is_complete(k / "checkpoint-5")[1]


def test_resume_picks_own_complete_checkpoint_and_keeps_one_history(killed_and_resumed):
    root, k, killed, resumed, old_id, new_id, after_kill = killed_and_resumed
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {k / 'checkpoint-2'}" in resumed.stdout  # not 3 (another run's) nor 5 (truncated)
    ref, got = losses(root / "ref"), losses(k)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))  # the steps before the kill too
    for (step, a), (_, b) in zip(ref, got):
        assert abs(a - b) < 1e-5, (step, a, b)
    rows = [json.loads(line) for line in (k / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))  # once each, in order
    assert read_seal(k / "checkpoint-4")["run_id"] == new_id and is_complete(k / "checkpoint-4")[0]
    assert json.loads((k / RUN_FILE).read_text())["run_id"] == new_id  # the same run, continued
    assert (k / "checkpoint-3").is_dir() and (k / "checkpoint-5").is_dir()  # nothing deleted
    assert not (k / STAGING).exists()  # the leftover staging folder was replaced and published


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _start(cmd, env=None):
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **ENV, **(env or {})})


def _sigterm_group_after_first_step(proc, also=None) -> str:
    """Read the output until the first logged loss, run `also()`, SIGTERM the process group, collect the rest."""
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "'loss'" in line:
                if also is not None:
                    also()
                os.killpg(proc.pid, signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        import psutil  # the ranks run in sessions of their own: end the whole tree

        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            p.kill()
        rest, _ = proc.communicate()
        pytest.fail(("".join(lines) + rest)[-6000:])
    return "".join(lines) + rest


def _check_preempted(out: Path, output: str):
    import psutil

    assert "preempted: checkpoint saved" in output, output[-4000:]
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if f"output_dir={out}" in (p.info["cmdline"] or [])]
    assert not left, f"processes of the run (ranks or DataLoader workers) still alive: {left}"
    ckpts = sorted(out.glob("checkpoint-*"))
    assert len(ckpts) == 1 and is_complete(ckpts[0])[0]
    assert not (out / "final").exists()
    assert "DataLoader worker" not in output  # no worker died of the signal
    return ckpts[0]


def test_sigterm_to_process_group_with_workers_one_rank(tmp_path, tiny_dir):
    from peft import PeftModel
    from transformers import LlavaNextForConditionalGeneration

    out = tmp_path / "run"
    # far more steps than the test lets run (the second start can take longer than 200 steps under load)
    args = [*COMMON, f"trainer.max_steps={ENDLESS}", f"trainer.save_steps={ENDLESS}", "data.num_workers=2"]
    proc = _start([sys.executable, "-m", "llava_train", "train", f"output_dir={out}", *args])
    second = {}

    def start_second_run_in_same_folder():
        second["proc"] = train(out, *args, "trainer.resume=auto")

    output = _sigterm_group_after_first_step(proc, also=start_second_run_in_same_folder)
    assert proc.returncode == 0, output[-4000:]
    ckpt = _check_preempted(out, output)
    # the concurrent start was refused while the first run was live, and changed nothing
    assert second["proc"].returncode != 0 and "in use by another live run" in second["proc"].stderr
    assert "pid " in second["proc"].stderr  # who holds it
    base = LlavaNextForConditionalGeneration.from_pretrained(str(tiny_dir))
    model = PeftModel.from_pretrained(base, str(ckpt))
    assert any("lora_B" in n for n, _ in model.named_parameters())
    assert read_seal(ckpt)["run_id"] == RunIdentity.read(out).run_id


def test_sigterm_to_process_group_with_workers_two_ranks(tmp_path, tiny_dir):
    out = tmp_path / "run"
    proc = _start(["bash", "launch/torchrun.sh", f"output_dir={out}", "deepspeed=none", *COMMON,
                   f"trainer.max_steps={ENDLESS}", f"trainer.save_steps={ENDLESS}",
                   "trainer.per_device_train_batch_size=1",
                   "data.num_workers=2"],
                  env={"PYTHON": sys.executable, "NPROC_PER_NODE": "2", "MASTER_PORT": free_port()})
    output = _sigterm_group_after_first_step(proc)
    assert proc.returncode == 0, output[-4000:]
    ckpt = _check_preempted(out, output)
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(ckpt))  # both ranks' parts, sealed


def _demo_shards(root: Path, shards: int = 2, per_shard: int = 32) -> str:
    """The first demo records as WebDataset tar shards (key.json + key.png)."""
    import tarfile

    records = json.loads((DEMO / "train.json").read_text())
    for s in range(shards):
        with tarfile.open(root / f"shard-{s}.tar", "w") as tar:
            for rec in records[s * per_shard:(s + 1) * per_shard]:
                image = rec.pop("image", None)  # the demo has text-only records too
                if image:
                    tar.add(DEMO / image, f"{rec['id']}.png")
                data = json.dumps(rec).encode()
                info = tarfile.TarInfo(f"{rec['id']}.json")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(root / "shard-*.tar")


def test_sigterm_to_process_group_with_streaming_workers(tmp_path, tiny_dir):
    """The streaming loader's workers ignore the preemption signal too (data.streaming=true)."""
    out = tmp_path / "run"
    common = [a for a in COMMON if not a.startswith(("data.train_path=", "data.image_root="))]
    proc = _start([sys.executable, "-m", "llava_train", "train", f"output_dir={out}", *common,
                   f"data.train_path={_demo_shards(tmp_path)}", "data.streaming=true", "data.num_workers=2",
                   f"trainer.max_steps={ENDLESS}", f"trainer.save_steps={ENDLESS}"])
    output = _sigterm_group_after_first_step(proc)
    assert proc.returncode == 0, output[-4000:]
    ckpt = _check_preempted(out, output)
    assert (ckpt / "stream_state_rank0.json").is_file()


def test_export_into_its_own_source_is_refused_and_deletes_nothing(reference):
    from llava_train.config.jobs import ExportConfig
    from llava_train.export.run import run as export
    from llava_train.train.validate import ConfigError

    ref = reference / "ref"
    first = export(ExportConfig(source=str(ref), merged=False), "")
    adapter = Path(first["written"]["adapter"])
    assert adapter == ref / "export" / "adapter"
    before = snapshot(adapter)
    for out in (ref / "export", adapter, adapter / "again"):  # contains it, is it, inside it
        with pytest.raises(ConfigError, match="overwrite its own source"):
            export(ExportConfig(source=str(adapter), merged=False), str(out))
    assert snapshot(adapter) == before
    again = export(ExportConfig(source=str(ref), merged=False), "")  # a re-export moves the old one aside
    moved = [p for p in (ref / "export").iterdir() if p.name.startswith("adapter.")]
    assert Path(again["written"]["adapter"]) == adapter and len(moved) == 1 and snapshot(moved[0]) == before
    assert SEAL not in before
