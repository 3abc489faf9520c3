"""Checkpoint-picking rules without a model: a checkpoint is complete when its seal lists exactly its files
and their sizes; `resume=auto` picks the newest complete checkpoint of the run. Real kills, resumes and
preemption signals: tests/train/test_faults.py."""

import json
import signal
from pathlib import Path

from llava_train.train.identity import RunIdentity
from llava_train.train.resume import (
    SEAL,
    check_resume,
    check_signals,
    checkpoint_identity,
    ignore_signals_in_worker,
    is_complete,
    latest_complete,
    seal,
)

RUN = RunIdentity("run-a", "f" * 16, {})


def _checkpoint(folder: Path, step: int, sealed: bool = True, run: RunIdentity = RUN) -> Path:
    p = folder / f"checkpoint-{step}"
    p.mkdir(parents=True)
    (p / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (p / "optimizer.pt").write_bytes(b"x" * 64)
    if sealed:
        seal(p, run, step)
    return p


def test_seal_lists_files_and_sizes_and_detects_any_change(tmp_path):
    p = _checkpoint(tmp_path, 2)
    record = json.loads((p / SEAL).read_text())
    assert record["files"] == {"optimizer.pt": 64, "trainer_state.json": len('{"global_step": 2}')}
    assert record["run_id"] == "run-a" and is_complete(p) == (True, "")
    (p / "optimizer.pt").write_bytes(b"")  # truncated (rewritten in place, killed)
    assert not is_complete(p)[0] and "optimizer.pt" in is_complete(p)[1]
    q = _checkpoint(tmp_path, 3)
    (q / "scheduler.pt").write_bytes(b"new")  # a file the seal does not cover
    assert not is_complete(q)[0]
    r = _checkpoint(tmp_path, 4)
    (r / "optimizer.pt").unlink()
    assert not is_complete(r)[0]
    assert not is_complete(_checkpoint(tmp_path, 5, sealed=False))[0]


def test_auto_picks_newest_complete_checkpoint_of_the_run(tmp_path):
    assert latest_complete(tmp_path, "run-a") is None  # nothing yet: start fresh
    _checkpoint(tmp_path, 2)
    ten = _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 12, sealed=False)  # interrupted while writing
    _checkpoint(tmp_path, 14, run=RunIdentity("run-b", "e" * 16, {}))  # another run's
    assert latest_complete(tmp_path, "run-a") == ten
    assert checkpoint_identity(ten).run_id == "run-a"


def test_explicit_incomplete_or_missing_checkpoint_is_refused(tmp_path):
    half = _checkpoint(tmp_path, 12, sealed=False)
    assert "not a complete checkpoint" in check_resume(str(half))[0]
    assert "not a folder" in check_resume(str(tmp_path / "nope"))[0]
    assert check_resume("auto") == [] and check_resume("false") == []
    assert check_resume(str(_checkpoint(tmp_path, 2))) == []


def test_worker_init_ignores_preemption_signals_then_runs_hf_seeding():
    seen = []
    init = ignore_signals_in_worker([signal.SIGUSR1], seen.append)
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        init(3)
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN and seen == [3]
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert check_signals(["SIGTERM", "SIGNOPE"]) == ["trainer.preemption_signals: unknown signal 'SIGNOPE'"]


EXITS_WITH_LIVE_WORKERS = """
import signal, torch
from torch.utils.data import DataLoader, IterableDataset
from llava_train.train.resume import ignore_signals_in_worker

class Endless(IterableDataset):
    def __iter__(self):
        i = 0
        while True:
            yield torch.tensor([i])
            i += 1

loader = DataLoader(Endless(), batch_size=2, num_workers=4, persistent_workers=True,
                    worker_init_fn=ignore_signals_in_worker([signal.SIGTERM, signal.SIGINT]))
it = iter(loader)
next(it)
print("exiting", flush=True)
"""


def test_process_exits_with_workers_that_ignore_sigterm_still_alive():
    """Workers left running at exit (an iterator not shut down) ignore multiprocessing's SIGTERM; the exit hook
    SIGKILLs all of them even though torch's SIGCHLD handler raises at the first death (it used to stop the
    hook there, and the process then waited for the other workers forever)."""
    import subprocess
    import sys

    from conftest import REPO

    for _ in range(3):  # the hang depended on when SIGCHLD arrived: it hung in most tries, not all
        proc = subprocess.run([sys.executable, "-c", EXITS_WITH_LIVE_WORKERS], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0 and "exiting" in proc.stdout, proc.stderr[-2000:]
