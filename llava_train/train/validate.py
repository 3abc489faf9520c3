"""Up-front validation: every incompatible setting collected into one error before any weights load."""

from __future__ import annotations

import os
from pathlib import Path

from llava_train.config import TrainJobConfig
from llava_train.data.sampler import batching_problems
from llava_train.data.templates import FAMILIES


class ConfigError(ValueError):
    """All problems with a job configuration at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_train(cfg: TrainJobConfig) -> None:
    """Raise `ConfigError` listing every problem found in `cfg` (no weights, no data decoding)."""
    problems: list[str] = []
    if cfg.model.family not in FAMILIES:
        problems.append(f"model.family={cfg.model.family!r} is not one of {sorted(FAMILIES)}")
    if cfg.model.dtype not in ("fp32", "bf16", "fp16"):
        problems.append(f"model.dtype={cfg.model.dtype!r}: use fp32, bf16 or fp16")
    if cfg.peft.method not in ("lora", "full"):
        problems.append(f"peft.method={cfg.peft.method!r}: use lora or full")
    if not Path(cfg.data.train_path).is_file():
        problems.append(f"data.train_path={cfg.data.train_path!r} is not a file")
    if cfg.data.eval_path and not Path(cfg.data.eval_path).is_file():
        problems.append(f"data.eval_path={cfg.data.eval_path!r} is not a file")
    if cfg.data.image_root and not Path(cfg.data.image_root).is_dir():
        problems.append(f"data.image_root={cfg.data.image_root!r} is not a folder")
    if cfg.data.overflow not in ("skip", "error"):
        problems.append(f"data.overflow={cfg.data.overflow!r}: use skip or error")
    if cfg.data.on_error not in ("skip", "error"):
        problems.append(f"data.on_error={cfg.data.on_error!r}: use skip or error")
    problems += batching_problems(cfg.data)
    if cfg.trainer.max_steps <= 0 and cfg.trainer.num_train_epochs <= 0:
        problems.append("set trainer.max_steps > 0 or trainer.num_train_epochs > 0")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(cfg.trainer, name) < 1:
            problems.append(f"trainer.{name} must be >= 1")
    if cfg.optim.lr <= 0:
        problems.append("optim.lr must be > 0")
    if problems:
        raise ConfigError(problems)
