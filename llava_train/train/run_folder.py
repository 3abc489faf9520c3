"""`RunFolder.claim` decides, before anything loads, what a start in an output folder does:

| folder holds                    | resume=false (default)       | resume=auto                  | overwrite_output_dir |
|---------------------------------|------------------------------|------------------------------|----------------------|
| nothing                         | new run                      | new run                      | new run              |
| the same run (same fingerprint) | old run moved aside, new run | continue from the newest     | old run moved aside, |
|                                 |                              | complete checkpoint; nothing | new run              |
|                                 |                              | to do once it has finished   |                      |
| another run / unknown files     | refused, with the choices    | refused, with the choices    | old run moved aside  |

"Moved aside" renames the old run's files into a sibling folder `<output_dir>.<old run id>`; nothing is
deleted. So `make demo` twice keeps both demos, and a requeued SLURM job (launched with trainer.resume=auto)
continues its run, or does nothing once it has finished. A lock file (`flock` on a regular file, never
followed through a symlink) held by rank 0 for the whole run refuses a second live run in the same folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llava_train.config import TrainJobConfig
from llava_train.files import FolderLock, LockedError, free_name
from llava_train.ranks import is_main_process
from llava_train.train.identity import LOCK_FILE, NOT_RUN_FILES, RUN_FILE, RunIdentity, differences
from llava_train.train.resume import checkpoint_identity, is_complete, latest_complete
from llava_train.train.validate import ConfigError


def run_files(out: Path) -> list[Path]:
    """What in `out` belongs to a run (anything but this attempt's Hydra files, the lock and staging)."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name not in NOT_RUN_FILES and not p.name.endswith(".log"))


def move_run_aside(out: Path, old: Optional[RunIdentity]) -> Path:
    """Rename the run files of `out` into a new sibling folder `<out>.<old run id>` (nothing is deleted)."""
    aside = free_name(out, old.run_id if old else "previous")
    aside.mkdir()
    for p in run_files(out):
        os.rename(p, aside / p.name)
    return aside


@dataclass
class Claim:
    """The outcome of `claim_output_dir`, the same on every rank."""

    identity: RunIdentity
    resume: Optional[str]  # checkpoint to resume from
    finished: bool = False  # resume=auto of a run that already finished: nothing to do
    moved_to: Optional[str] = None
    error: Optional[list[str]] = None


def _choices(out: Path) -> str:
    return ("choose one: trainer.resume=auto to continue the run in this folder (same configuration and data "
            f"only), output_dir=<another folder>, or trainer.overwrite_output_dir=true to move the old run "
            f"aside to {out}.<its run id> (nothing is deleted)")


def decide(cfg: TrainJobConfig, out: Path) -> Claim:
    """What starting `cfg` in `out` does (rank 0; see the module doc). Moves the old run aside when that is the
    decision; returns a Claim with `error` set when the start is refused."""

    t = cfg.trainer
    mine = RunIdentity.new(cfg)
    old = RunIdentity.read(out)
    files = run_files(out)
    resume = str(t.resume).strip()
    auto = resume.lower() == "auto"
    explicit = None if auto or resume.lower() in ("", "false", "none", "no", "0") else resume
    same = old is not None and old.fingerprint == mine.fingerprint

    if explicit:
        ok, why = is_complete(Path(explicit))
        if not ok:
            return Claim(mine, None, error=[f"trainer.resume={explicit!r} is not a complete checkpoint ({why}); "
                                            "pick another one or use trainer.resume=auto"])
        theirs = checkpoint_identity(Path(explicit))
        if (theirs is None or theirs.fingerprint != mine.fingerprint) and not t.resume_other_run:
            what = ("has no run identity (written by another tool or an older version)" if theirs is None else
                    f"belongs to run {theirs.run_id} of another configuration or data; differs in: "
                    + "; ".join(differences(theirs.inputs, mine.inputs)[:8]))
            return Claim(mine, None, error=[f"trainer.resume={explicit!r} {what}. To continue from it anyway "
                                            "(a new run starting from its weights, optimizer and schedule), add "
                                            "trainer.resume_other_run=true"])
        if t.overwrite_output_dir and files and Path(explicit).resolve().is_relative_to(out.resolve()):
            return Claim(mine, None, error=[f"trainer.resume={explicit!r} lies inside output_dir, whose run "
                                            "trainer.overwrite_output_dir=true would move aside: resume into "
                                            "another output_dir"])
        if theirs is not None and theirs.fingerprint == mine.fingerprint:
            mine.run_id, mine.created = theirs.run_id, theirs.created  # the same run, continued

    if files and t.overwrite_output_dir:
        return Claim(mine, explicit, moved_to=str(move_run_aside(out, old)))
    if files and not same and not (explicit and old is not None and old.run_id == mine.run_id):
        what = (f"run {old.run_id} of another configuration or data (differs in: "
                + "; ".join(differences(old.inputs, mine.inputs)[:8]) + ")" if old is not None else
                f"files of another run without a {RUN_FILE} ({', '.join(p.name for p in files[:5])})")
        return Claim(mine, None, error=[f"output_dir {out} holds {what}; {_choices(out)}"])
    if files and explicit:
        if old is not None and old.run_id == mine.run_id:
            return Claim(mine, explicit)
        return Claim(mine, explicit, moved_to=str(move_run_aside(out, old)))
    if files and auto:  # the same run: continue it
        mine.run_id, mine.created = old.run_id, old.created
        if (out / "final").is_dir() and (out / "metrics.json").is_file():
            return Claim(mine, None, finished=True)
        found = latest_complete(out, old.run_id)
        return Claim(mine, str(found) if found else None)
    if files:  # resume=false, the same configuration and data: a new attempt; the old one is kept aside
        return Claim(mine, None, moved_to=str(move_run_aside(out, old)))
    return Claim(mine, explicit)


class RunFolder:
    """Rank 0 holds the output folder's lock for the whole run and decides what the start does; the decision
    (or the refusal) is shared with every rank."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.lock = FolderLock(self.out / LOCK_FILE)

    def claim(self, cfg: TrainJobConfig) -> Claim:
        import torch.distributed as dist


        claim = None
        if is_main_process():
            self.out.mkdir(parents=True, exist_ok=True)
            try:
                self.lock.acquire()
            except (LockedError, OSError) as e:
                claim = Claim(RunIdentity("", "", {}), None,
                              error=[f"{e}: two runs cannot share an output folder; wait for it to finish or "
                                     "use output_dir=<another folder>"])
            if claim is None:
                claim = decide(cfg, self.out)
                if not claim.error and not claim.finished:
                    claim.identity.write(self.out)
        if dist.is_available() and dist.is_initialized():
            box = [claim]
            dist.broadcast_object_list(box, src=0)
            claim = box[0]
        if claim.error:
            self.release()
            raise ConfigError(claim.error)
        return claim

    def release(self) -> None:
        self.lock.release()
