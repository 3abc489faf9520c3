"""Run identity without training: what defines a run (fingerprint), what a start in a used output folder does
(the table in llava_train/train/run_folder.py), and the folder lock."""

import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import DEMO
from llava_train.cli import CONFIG_DIR
from llava_train.files import FolderLock, LockedError
from llava_train.train.identity import LOCK_FILE, RUN_FILE, RunIdentity, fingerprint_inputs
from llava_train.train.resume import seal
from llava_train.train.run_folder import RunFolder, decide
from llava_train.train.validate import ConfigError


def job(*overrides, data=DEMO / "train.json"):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=[f"data.train_path={data}", "data.eval_path=null",
                                                               *overrides]))


def fp(cfg):
    return RunIdentity.new(cfg).fingerprint


def test_fingerprint_covers_training_not_where_or_how_it_starts(tmp_path):
    base = fp(job())
    assert fp(job("output_dir=/elsewhere", "trainer.resume=auto", "logger=wandb", "data.num_workers=4")) == base
    assert fp(job("optim.lr=1e-3")) != base and fp(job("seed=1")) != base
    copy = tmp_path / "moved" / "train.json"  # the same data in another place: the same run
    copy.parent.mkdir()
    copy.write_bytes((DEMO / "train.json").read_bytes())
    assert fp(job(data=copy)) == base
    copy.write_bytes(copy.read_bytes().replace(b"red", b"blu", 1))  # same size, other content
    assert fp(job(data=copy)) != base
    assert fingerprint_inputs(job())["data_files"]["train"]["name"] == "train.json"


def fake_run(out: Path, cfg, *, finished=False, steps=(2,)) -> RunIdentity:
    """A run folder as `llava train` leaves it (run.json, config, complete checkpoints, final/)."""
    out.mkdir(parents=True, exist_ok=True)
    ident = RunIdentity.new(cfg)
    ident.write(out)
    (out / "config.yaml").write_text("x: 1\n")
    for s in steps:
        c = out / f"checkpoint-{s}"
        c.mkdir()
        (c / "trainer_state.json").write_text("{}")
        ident.write(c)
        seal(c, ident, s)
    if finished:
        (out / "final").mkdir()
        (out / "metrics.json").write_text("{}")
    return ident


def test_empty_folder_or_only_hydra_files_starts_a_new_run(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "cli.log").write_text("")
    claim = decide(job(), tmp_path)
    assert not claim.error and claim.resume is None and claim.moved_to is None


def test_another_run_is_refused_with_the_choices_and_what_differs(tmp_path):
    fake_run(tmp_path, job())
    claim = decide(job("optim.lr=1e-3"), tmp_path)
    msg = claim.error[0]
    assert "holds run" in msg and "optim.lr: 0.002 -> 0.001" in msg
    assert "trainer.resume=auto" in msg and "output_dir=<another folder>" in msg and "overwrite_output_dir" in msg
    assert decide(job("optim.lr=1e-3", "trainer.resume=auto"), tmp_path).error  # auto: the same run only
    (tmp_path / RUN_FILE).unlink()  # files without an identity (an older version, another tool)
    assert "without a run.json" in decide(job(), tmp_path).error[0]


def test_overwrite_moves_the_old_run_aside_and_deletes_nothing(tmp_path):
    out = tmp_path / "run"
    old = fake_run(out, job())
    claim = decide(job("optim.lr=1e-3", "trainer.overwrite_output_dir=true"), out)
    assert not claim.error and claim.moved_to == f"{out}.{old.run_id}"
    aside = Path(claim.moved_to)
    assert (aside / "checkpoint-2").is_dir() and RunIdentity.read(aside).run_id == old.run_id
    assert not (out / "checkpoint-2").exists() and not (out / RUN_FILE).exists()


def test_same_run_rerun_starts_anew_and_keeps_the_old_one(tmp_path):
    """`make demo` twice: resume=false with the same configuration and data moves the old run aside."""
    out = tmp_path / "demo"
    old = fake_run(out, job(), finished=True)
    claim = decide(job(), out)
    assert not claim.error and claim.resume is None and claim.identity.run_id != old.run_id
    assert Path(claim.moved_to, "final").is_dir()


def test_same_run_with_resume_auto_continues_or_is_done(tmp_path):
    out = tmp_path / "run"
    old = fake_run(out, job(), steps=(2, 4))
    claim = decide(job("trainer.resume=auto"), out)
    assert claim.resume == str(out / "checkpoint-4") and claim.identity.run_id == old.run_id
    (out / "final").mkdir()
    (out / "metrics.json").write_text("{}")
    assert decide(job("trainer.resume=auto"), out).finished  # a requeued job of a finished run: nothing to do


def test_explicit_checkpoint_of_another_run_needs_the_flag(tmp_path):
    other = tmp_path / "other"
    fake_run(other, job("optim.lr=1e-3"))
    ckpt = other / "checkpoint-2"
    claim = decide(job(f"trainer.resume={ckpt}"), tmp_path / "new")
    assert "trainer.resume_other_run=true" in claim.error[0] and "optim.lr" in claim.error[0]
    ok = decide(job(f"trainer.resume={ckpt}", "trainer.resume_other_run=true"), tmp_path / "new2")
    assert not ok.error and ok.resume == str(ckpt)
    same = tmp_path / "same"
    fake_run(same, job())
    moved = decide(job(f"trainer.resume={same / 'checkpoint-2'}"), tmp_path / "new3")
    assert not moved.error and moved.identity.run_id == RunIdentity.read(same).run_id  # the run, continued


def test_lock_refuses_a_second_live_run_and_is_never_followed_through_a_symlink(tmp_path):
    out = tmp_path / "run"
    first = RunFolder(out)
    claim = first.claim(job())
    assert json.loads((out / RUN_FILE).read_text())["run_id"] == claim.identity.run_id
    with pytest.raises(ConfigError, match="in use by another live run"):
        RunFolder(out).claim(job("trainer.resume=auto"))
    first.release()
    again = RunFolder(out)
    assert again.claim(job("trainer.resume=auto")).identity.run_id == claim.identity.run_id  # free once released
    again.release()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    other = tmp_path / "other"
    other.mkdir()
    os.symlink(victim, other / LOCK_FILE)
    with pytest.raises(OSError, match="symbolic link"):
        FolderLock(other / LOCK_FILE).acquire()
    assert victim.read_text() == "precious"
    with pytest.raises(ConfigError, match="symbolic link"):
        RunFolder(other).claim(job())
    assert victim.read_text() == "precious"
    held = FolderLock(tmp_path / "l").acquire()
    with pytest.raises(LockedError):
        FolderLock(tmp_path / "l").acquire()
    held.release()


def test_symlinked_lazy_index_lock_never_truncates_its_target(tmp_path, processor):
    from llava_train.config import DataConfig
    from llava_train.data.index import LazyConversationDataset

    data = tmp_path / "train.json"
    data.write_bytes((DEMO / "train.json").read_bytes())
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "train.json.lazyindex.lock")
    from llava_train.data.encoder import Encoder
    from llava_train.data.images import ImageGeometry
    from llava_train.data.templates import get_family

    cfg = DataConfig(train_path=str(data), image_root=str(DEMO))
    enc = Encoder.from_config(processor.tokenizer, get_family("mistral"), ImageGeometry.from_processor(processor), cfg)
    ds = LazyConversationDataset(str(data), cfg, enc, processor.image_processor)
    assert len(ds) > 0 and victim.read_text() == "precious"
