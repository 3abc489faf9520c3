"""What gets trained: LoRA on the language model or full fine-tuning; freezing; parameter groups."""

from __future__ import annotations

import re
from collections import OrderedDict

import torch

from llava_train.config import ModelConfig, OptimConfig, PeftConfig

VISION_PREFIX = "model.vision_tower"
PROJECTOR = "multi_modal_projector"
LANGUAGE_PREFIX = "model.language_model"


def _matching_modules(model: torch.nn.Module, pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and rx.fullmatch(n)]


def lora_targets(model: torch.nn.Module, cfg: PeftConfig) -> list[str]:
    """Module names the LoRA regex hits; refuses to match nothing or to touch the vision tower by accident."""
    names = _matching_modules(model, cfg.target_modules)
    if not names:
        raise ValueError(f"peft.target_modules={cfg.target_modules!r} matches no linear layer")
    vision = [n for n in names if n.startswith(VISION_PREFIX)]
    if vision and not cfg.train_vision_tower:
        raise ValueError(f"peft.target_modules matches {len(vision)} vision-tower layer(s) (e.g. {vision[0]}); "
                         "target the language model by full name, or set peft.train_vision_tower=true")
    return names


def apply_peft(model, peft_cfg: PeftConfig, model_cfg: ModelConfig):
    """Wrap `model` for the chosen method; returns the model to train."""
    if peft_cfg.method == "full":
        for name, p in model.named_parameters():
            p.requires_grad = not name.startswith(VISION_PREFIX) or peft_cfg.train_vision_tower
        return model
    if peft_cfg.method != "lora":
        raise ValueError(f"unknown peft.method {peft_cfg.method!r}")
    from peft import LoraConfig, get_peft_model

    lora_targets(model, peft_cfg)
    modules_to_save = list(model_cfg.modules_to_save)
    if peft_cfg.train_projector:
        modules_to_save.append(PROJECTOR)
    config = LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=peft_cfg.target_modules,
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def module_group(name: str) -> str:
    """Coarse owner of a parameter, for summaries and learning-rate groups."""
    if "vision_tower" in name:
        return "vision_tower"
    if PROJECTOR in name:
        return "projector"
    if "image_newline" in name:
        return "image_newline"
    if "lora_" in name:
        return "lora"
    if "embed_tokens" in name:
        return "embed_tokens"
    if "lm_head" in name:
        return "lm_head"
    return "language_model"


def trainable_summary(model) -> "OrderedDict[str, tuple[int, int]]":
    """{group: (trainable, total)} parameter counts."""
    out: OrderedDict[str, list[int]] = OrderedDict()
    for name, p in model.named_parameters():
        t = out.setdefault(module_group(name), [0, 0])
        t[1] += p.numel()
        if p.requires_grad:
            t[0] += p.numel()
    return OrderedDict((k, (v[0], v[1])) for k, v in out.items())


def param_groups(model, cfg: OptimConfig) -> list[dict]:
    """Optimizer parameter groups: projector at its own learning rate; no weight decay on biases/norms."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = cfg.projector_lr if (PROJECTOR in name and cfg.projector_lr is not None) else cfg.lr
        wd = 0.0 if (p.ndim < 2 or "norm" in name or "image_newline" in name) else cfg.weight_decay
        groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
