"""Which modules are which: LlavaNext's module-name prefixes, the coarse owner of a parameter, the LoRA target
regex and its checks against a model's module tree (a meta-device copy is enough)."""

from __future__ import annotations

import re

import torch

from llava_train.config import ModelConfig, PeftConfig

VISION_PREFIX = "model.vision_tower"
PROJECTOR = "multi_modal_projector"
LANGUAGE_PREFIX = "model.language_model"
IMAGE_NEWLINE = "image_newline"


def module_group(name: str) -> str:
    """Coarse owner of a parameter, for summaries and learning-rate groups."""
    if "vision_tower" in name:
        return "vision_tower"
    if PROJECTOR in name:
        return "projector"
    if IMAGE_NEWLINE in name:
        return "image_newline"
    if "lora_" in name:
        return "lora"
    if "embed_tokens" in name:
        return "embed_tokens"
    if "lm_head" in name:
        return "lm_head"
    return "language_model"


def lora_target_regex(cfg: PeftConfig) -> str:
    """The regex peft full-matches against module names: language-model targets, extras, vision opt-in."""
    parts = [cfg.target_modules]
    if cfg.extra_target_modules:
        parts.append(cfg.extra_target_modules)
    if cfg.train_vision_tower:
        parts.append(cfg.vision_target_modules)
    return "|".join(f"(?:{p})" for p in parts)


def _linear_names(model: torch.nn.Module, pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and rx.fullmatch(n)]


def target_problems(model: torch.nn.Module, cfg: PeftConfig, model_cfg: ModelConfig) -> list[str]:
    """What is wrong with the LoRA targets and modules_to_save on `model` (a meta-device copy is enough)."""
    problems = []
    for key in ("target_modules", "extra_target_modules", "vision_target_modules"):
        try:
            re.compile(getattr(cfg, key))
        except re.error as e:
            problems.append(f"peft.{key} is not a valid regex: {e}")
    if problems:
        return problems
    names = _linear_names(model, cfg.target_modules)
    if not names:
        problems.append(f"peft.target_modules={cfg.target_modules!r} matches no linear layer (it is full-matched "
                        "against full module names such as model.language_model.layers.0.self_attn.q_proj)")
    if cfg.extra_target_modules and not _linear_names(model, cfg.extra_target_modules):
        problems.append(f"peft.extra_target_modules={cfg.extra_target_modules!r} matches no linear layer")
    if not cfg.train_vision_tower:
        for key in ("target_modules", "extra_target_modules"):
            pattern = getattr(cfg, key)
            vision = [n for n in (_linear_names(model, pattern) if pattern else []) if n.startswith(VISION_PREFIX)]
            if vision:
                problems.append(f"peft.{key} matches {len(vision)} vision-tower layer(s) (e.g. {vision[0]}): "
                                "target the language model by full name, or opt in with peft.train_vision_tower=true")
    elif not _linear_names(model, cfg.vision_target_modules):
        problems.append(f"peft.vision_target_modules={cfg.vision_target_modules!r} matches no linear layer")
    module_names = [n for n, _ in model.named_modules()]
    for entry in model_cfg.modules_to_save:
        if not any(n == entry or n.endswith("." + entry) for n in module_names):
            problems.append(f"model.modules_to_save entry {entry!r} names no module")
    return problems
