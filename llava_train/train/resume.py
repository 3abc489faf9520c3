"""Resuming and preemption: complete checkpoints, `trainer.resume=auto|PATH|false`, SIGTERM/SIGUSR1.

HF Trainer writes `checkpoint-N/` file by file (adapter with the projector and trained modules, optimizer,
scheduler, RNG state of every rank, trainer state holding the step and the log history, from which the
seeded sampler's position is replayed). `LlavaTrainer._save_checkpoint` (train/trainer.py) has every rank
write into `<output_dir>/.staging/checkpoint-N`, then rank 0, after a barrier, writes a seal listing every
file with its size and the run's identity (`seal`), and renames the folder into place. A checkpoint folder
is thus never rewritten in place, and a folder is complete exactly when its seal matches its files
(`is_complete`); `resume=auto` only picks complete checkpoints of the same run (`latest_complete`).

`Preemption` turns SIGTERM / SIGUSR1 (what SLURM sends before preempting or at the time limit) into
"save a checkpoint at the end of this step and stop": the flag is agreed on by all ranks (the save is
collective under DeepSpeed), and the recipe then exits cleanly without the final save/eval. DataLoader
workers ignore these signals (`ignore_signals_in_worker`), so a signal sent to the whole process group
(SLURM, `docker stop`) reaches the main process only; it stops its workers itself.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing
import multiprocessing.util  # registers its exit hook now, so `_kill_workers_at_exit` (registered later) runs first
import os
import re
import signal
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from llava_train.config import TrainerConfig
from llava_train.files import file_sizes, write_json_atomic
from llava_train.train.identity import RunIdentity

SEAL = "llava_checkpoint_complete.json"
CHECKPOINT_RX = re.compile(r"^checkpoint-(\d+)$")
OFF = ("", "false", "none", "no", "0")


def seal(folder: Path, identity: Optional[RunIdentity], step: int) -> None:
    """Write the seal: every file now in `folder` with its size, and the run it belongs to."""
    files = file_sizes(folder)
    files.pop(SEAL, None)
    record = {"global_step": step, "files": files}
    if identity is not None:
        record.update(run_id=identity.run_id, fingerprint=identity.fingerprint)
    write_json_atomic(folder / SEAL, record)


def read_seal(folder: Path) -> Optional[dict]:
    try:
        return json.loads((Path(folder) / SEAL).read_text())
    except (OSError, ValueError):
        return None


def is_complete(folder: Path) -> tuple[bool, str]:
    """(complete?, why not): the seal exists and lists exactly the files in the folder, with their sizes."""
    folder = Path(folder)
    if not folder.is_dir():
        return False, "not a folder"
    record = read_seal(folder)
    if record is None or "files" not in record:
        return False, f"no valid {SEAL}: it was interrupted while being written, or written by another tool"
    found = file_sizes(folder)
    found.pop(SEAL, None)
    if found != record["files"]:
        bad = sorted(set(found) ^ set(record["files"])) or [
            f for f in found if found[f] != record["files"].get(f)]
        return False, f"its files differ from its seal ({', '.join(bad[:5])})"
    return True, ""


def checkpoint_identity(folder: Path) -> Optional[RunIdentity]:
    """The run a checkpoint belongs to (its run.json, else the ids in its seal), or None."""
    identity = RunIdentity.read(folder)
    if identity is None:
        record = read_seal(folder) or {}
        if record.get("run_id"):
            identity = RunIdentity(record["run_id"], record["fingerprint"], {})
    return identity


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) for every `checkpoint-N` folder, oldest first."""
    found = []
    if Path(output_dir).is_dir():
        for p in Path(output_dir).iterdir():
            m = CHECKPOINT_RX.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_complete(output_dir: Path, run_id: Optional[str] = None) -> Optional[Path]:
    """The newest complete checkpoint (of run `run_id` when given)."""
    for _, p in reversed(checkpoints(output_dir)):
        if is_complete(p)[0] and (run_id is None or (read_seal(p) or {}).get("run_id") == run_id):
            return p
    return None


def check_resume_settings(cfg: TrainerConfig) -> list[str]:
    """Problems with resume / preemption / data-order settings (for validate.check_train)."""
    problems = check_resume(cfg.resume) + check_signals(cfg.preemption_signals)
    if cfg.data_order not in ("random", "sequential"):
        problems.append(f"trainer.data_order={cfg.data_order!r}: use random or sequential")
    if cfg.overwrite_output_dir and str(cfg.resume).strip().lower() == "auto":
        problems.append("trainer.overwrite_output_dir=true moves the run in output_dir aside while "
                        "trainer.resume=auto continues it: choose one")
    return problems


def check_resume(value: str) -> list[str]:
    v = str(value).strip()
    if v.lower() in OFF or v.lower() == "auto":
        return []
    if not Path(v).is_dir():
        return [f"trainer.resume={v!r}: not a folder; use auto, false, or a checkpoint-N folder"]
    ok, why = is_complete(Path(v))
    if not ok:
        return [f"trainer.resume={v!r} is not a complete checkpoint ({why}); pick an earlier one or use "
                "trainer.resume=auto"]
    return []


def ignore_signals_in_worker(signals: list[int], init_fn=None):
    """A DataLoader `worker_init_fn`: the worker ignores `signals` (the main process handles them and shuts
    the workers down), then runs `init_fn` (HF's seeding) if any. Called in the main process, it also makes
    sure workers are stopped at exit (`_kill_workers_at_exit`)."""
    global _EXIT_HOOK_PID
    if _EXIT_HOOK_PID != os.getpid():
        atexit.register(_kill_workers_at_exit)  # runs before multiprocessing's own (atexit is LIFO; see the import)
        _EXIT_HOOK_PID = os.getpid()
    return _WorkerInit(tuple(signals), init_fn)


_EXIT_HOOK_PID: Optional[int] = None


def _kill_workers_at_exit() -> None:
    """At exit multiprocessing terminates daemonic children (DataLoader workers still alive when the loader was
    not shut down) with SIGTERM, which these workers ignore, and then waits for them forever: end them with
    SIGKILL instead (they hold nothing to save). Only in the process that registered it (a forked process
    inherits the hook). torch's DataLoader SIGCHLD handler raises in the main process as soon as one of its
    workers dies by a signal, which would abort this hook after the first kill and leave the others alive
    (then multiprocessing waits for them forever): the handler is reset first, all workers are killed, then
    joined."""
    if os.getpid() != _EXIT_HOOK_PID:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = [c for c in multiprocessing.active_children() if c.daemon and c.pid is not None]
    for child in children:
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for child in children:
        try:
            child.join(timeout=5)
        except Exception:  # noqa: BLE001 - at exit nothing else can be done; the process was SIGKILLed anyway
            pass


class _WorkerInit:
    def __init__(self, signals: tuple[int, ...], init_fn):
        self.signals, self.init_fn = signals, init_fn

    def __call__(self, worker_id: int) -> None:
        for s in self.signals:
            signal.signal(s, signal.SIG_IGN)
        if self.init_fn is not None:
            self.init_fn(worker_id)


class Preemption(TrainerCallback):
    """On one of `signals`: checkpoint at the end of the current step, then stop training."""

    def __init__(self, signals: list[str]):
        self.signals = [getattr(signal, s) for s in signals]
        self.received: Optional[int] = None
        self.preempted = False
        self.checkpoint: Optional[str] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        self.received = signum

    def on_train_begin(self, args, state, control, **kwargs):
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return control

    def _agreed(self, args) -> bool:
        flag = self.received is not None
        if dist.is_available() and dist.is_initialized():
            device = args.device if dist.get_backend() == "nccl" else torch.device("cpu")
            t = torch.tensor([1.0 if flag else 0.0], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        return flag

    def on_step_end(self, args, state, control, **kwargs):
        if not self.preempted and self._agreed(args):
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.preempted:
            self.checkpoint = str(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        previous = dict(self._previous)
        for s, handler in previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        handler = previous.get(self.received)
        if self.preempted and callable(handler):
            # The checkpoint is on disk: let whoever handled the signal before us act on it too (submitit's
            # handler requeues the job, which then continues with trainer.resume=auto).
            handler(self.received, None)
        return control


def check_signals(names: list[str]) -> list[str]:
    return [f"trainer.preemption_signals: unknown signal {n!r}" for n in names
            if not isinstance(getattr(signal, n, None), signal.Signals)]
