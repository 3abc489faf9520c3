"""Which process this is: the package's one rank check, and rank-0-only console output.

The process group's rank and size once it is up (what accelerate's `PartialState`, which the Trainer builds,
reads), the launcher's RANK / WORLD_SIZE before that (torchrun, the deepspeed launcher, `accelerate launch`,
and SLURM through submitit set them). Not `PartialState()` itself: constructing it before `TrainingArguments`
would fix accelerate's distributed type ahead of HF's own DeepSpeed / FSDP setup.

Console output is logging (through Hydra's console and file handlers under the CLI): rank 0 logs the
package's INFO lines, the other ranks only warnings and errors, the rule HF applies to its own logs
(`TrainingArguments.log_level_replica`).
"""

from __future__ import annotations

import logging
import os

import torch.distributed as dist

PACKAGE_LOGGER = "llava_train"


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def log_on_main_process_only() -> None:
    """INFO from this package on rank 0, WARNING and above on the others."""
    logging.getLogger(PACKAGE_LOGGER).setLevel(logging.INFO if is_main_process() else logging.WARNING)
