"""Resuming and preemption: sealed checkpoints, `trainer.resume=auto|PATH|false`, SIGTERM/SIGUSR1.

HF Trainer writes `checkpoint-N/` file by file (adapter with the projector and trained modules,
optimizer, scheduler, RNG state of every rank, trainer state holding the step, from which the seeded
sampler's position is replayed). A job killed while writing leaves a folder that looks like a
checkpoint but cannot be resumed. `CheckpointSealer` writes a marker file into the folder once every
rank has finished writing it (atomically: temporary file + rename); `resume=auto` only ever picks
sealed checkpoints, and unsealed leftovers are removed before training continues.

`Preemption` turns SIGTERM / SIGUSR1 (what SLURM sends before preempting or at the time limit) into
"save a checkpoint at the end of this step and stop": the flag is agreed on by all ranks (the save is
collective under DeepSpeed), and the recipe then exits cleanly without the final save/eval.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from llava_train.config import TrainerConfig

SEAL = "llava_checkpoint_complete.json"
CHECKPOINT_RX = re.compile(r"^checkpoint-(\d+)$")
OFF = ("", "false", "none", "no", "0")


def checkpoints(output_dir: Path) -> list[tuple[int, Path, bool]]:
    """(step, folder, sealed) for every `checkpoint-N` folder, oldest first."""
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = CHECKPOINT_RX.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p, (p / SEAL).is_file()))
    return sorted(found)


def latest_sealed(output_dir: Path) -> Optional[Path]:
    sealed = [p for _, p, ok in checkpoints(output_dir) if ok]
    return sealed[-1] if sealed else None


def check_resume_settings(cfg: TrainerConfig) -> list[str]:
    """Problems with resume / preemption / data-order settings (for validate.check_train)."""
    problems = check_resume(cfg.resume) + check_signals(cfg.preemption_signals)
    if cfg.data_order not in ("random", "sequential"):
        problems.append(f"trainer.data_order={cfg.data_order!r}: use random or sequential")
    return problems


def check_resume(value: str) -> list[str]:
    v = str(value).strip()
    if v.lower() in OFF or v.lower() == "auto":
        return []
    if not Path(v).is_dir():
        return [f"trainer.resume={v!r}: not a folder; use auto, false, or a checkpoint-N folder"]
    if not (Path(v) / SEAL).is_file():
        return [f"trainer.resume={v!r} is not a complete checkpoint (no {SEAL}: it was interrupted while "
                "being written); pick an earlier one or use trainer.resume=auto"]
    return []


def resolve_resume(value: str, output_dir: Path) -> Optional[str]:
    """The checkpoint folder to resume from, or None to start fresh."""
    v = str(value).strip()
    if v.lower() in OFF:
        return None
    if v.lower() == "auto":
        found = latest_sealed(output_dir)
        return str(found) if found else None
    return v


def drop_unsealed(output_dir: Path, after: Optional[str]) -> list[Path]:
    """Remove unsealed checkpoint folders newer than the one resumed from (rank 0 only): they are
    half-written leftovers that the continuing run would otherwise partly overwrite or rotate. Nothing is
    removed when not resuming."""
    m = CHECKPOINT_RX.match(Path(after).name) if after else None
    if m is None:
        return []
    start = int(m.group(1))
    removed = []
    for step, p, ok in checkpoints(output_dir):
        if not ok and step > start:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


class CheckpointSealer(TrainerCallback):
    """Seal each checkpoint once all ranks have written their part of it."""

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's optimizer partition / RNG state is on disk
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            tmp = folder / (SEAL + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"global_step": state.global_step}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / SEAL)
        return control


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
