"""Optimizer parameter groups: per-module learning rates and weight decay."""

from __future__ import annotations

from llava_train.config import OptimConfig
from llava_train.model.targets import module_group


def param_groups(model, cfg: OptimConfig) -> list[dict]:
    """Optimizer parameter groups, each named: per-module learning rates (projector and image_newline at
    `projector_lr`, vision tower at `vision_lr`, the rest at `lr`); no weight decay on 1-D parameters and
    names containing an `optim.no_decay` entry."""
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = module_group(name)
        if owner == "vision_tower":
            kind, lr = "vision", cfg.vision_lr
        elif owner in ("projector", "image_newline"):
            kind, lr = "projector", cfg.projector_lr
        else:
            kind, lr = "language", None
        decay = not (p.ndim < 2 or any(s in name for s in cfg.no_decay))
        group = groups.setdefault((kind, decay), {
            "name": kind if decay else f"{kind}_no_decay",
            "params": [],
            "lr": cfg.lr if lr is None else lr,
            "weight_decay": cfg.weight_decay if decay else 0.0,
        })
        group["params"].append(p)
    # language first: HF Trainer logs the first group's learning rate as "learning_rate"
    order = {"language": 0, "projector": 1, "vision": 2}
    return [groups[k] for k in sorted(groups, key=lambda k: (order[k[0]], not k[1]))]
