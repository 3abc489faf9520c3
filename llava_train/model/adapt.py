"""What gets trained: LoRA/QLoRA on the language model or full fine-tuning; freezing; checkpointing;
parameter groups; the start-of-run summary; parameters peft's adapter file leaves out."""

from __future__ import annotations

import os
import re
from collections import OrderedDict

import torch

from llava_train.config import ModelConfig, OptimConfig, PeftConfig

VISION_PREFIX = "model.vision_tower"
PROJECTOR = "multi_modal_projector"
LANGUAGE_PREFIX = "model.language_model"
IMAGE_NEWLINE = "image_newline"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Name pieces of what peft itself saves in an adapter (tuner weights, modules_to_save copies, trainable tokens).
_PEFT_SAVED = ("lora_", ".modules_to_save.", ".token_adapter.")


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


def checkpoint_reentrant(model_cfg: ModelConfig, zero_stage: int) -> bool:
    """Non-reentrant checkpointing, except under ZeRO-3 (transformers#47254: non-reentrant recomputation
    sees frozen parameters already re-partitioned to shape [0] and raises CheckpointError)."""
    if model_cfg.checkpoint_reentrant is not None:
        return model_cfg.checkpoint_reentrant
    return zero_stage == 3


def enable_checkpointing(model, model_cfg: ModelConfig, zero_stage: int, every_n_layers: int = 1,
                         offload: bool = False) -> None:
    """Gradient checkpointing on the base model (before peft wraps it); see `set_input_grads`.

    `every_n_layers` > 1: selective checkpointing, counted over the language model's decoder layers
    (transformers' own count also includes the vision tower's layers); `offload`: the checkpointed
    layers' inputs wait in pinned host memory (transformers' `offload`)."""
    reentrant = checkpoint_reentrant(model_cfg, zero_stage)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant},
                                          offload=offload)
    if every_n_layers > 1:
        from llava_train.model.speed import llava_model

        for i, layer in enumerate(llava_model(model).language_model.layers):
            layer.gradient_checkpointing = i % every_n_layers == 0
    # its input-grad hooks are replaced by set_input_grads (peft registers a second set meanwhile, and
    # transformers keeps handles only to the latest set)
    model.disable_input_require_grads()


def _require_grad(module, inputs, output):
    output.requires_grad_(True)


def set_input_grads(model, *, language: bool, vision: bool) -> None:
    """Make the frozen embeddings' outputs require grad where checkpointed trainable layers follow them.

    transformers (and peft, for non-quantised models) hook every sub-model's input embeddings when
    checkpointing is enabled, the CLIP patch embedding included: a frozen vision tower then runs a
    useless backward pass. We replace those hooks by the ones needed: language embeddings under LoRA,
    the vision patch embedding only with vision LoRA."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.disable_input_require_grads()
    for hook in getattr(base, "_llava_train_input_grad_hooks", []):
        hook.remove()
    embeddings = ([base.get_input_embeddings()] if language else []) + (
        [base.model.vision_tower.get_input_embeddings()] if vision else [])
    base._llava_train_input_grad_hooks = [e.register_forward_hook(_require_grad) for e in embeddings]


def apply_peft(model, peft_cfg: PeftConfig, model_cfg: ModelConfig, *, gradient_checkpointing: bool = False,
               zero_stage: int = 0, checkpoint_every_n_layers: int = 1, offload_checkpoints: bool = False):
    """Freeze/wrap `model` for the chosen method; returns the model to train."""
    if peft_cfg.method == "full":
        for name, p in model.named_parameters():
            if name.startswith(VISION_PREFIX):
                p.requires_grad = peft_cfg.train_vision_tower
            elif PROJECTOR in name:
                p.requires_grad = peft_cfg.train_projector
            elif name.endswith(IMAGE_NEWLINE):
                p.requires_grad = peft_cfg.train_image_newline
            else:
                p.requires_grad = True
        if gradient_checkpointing:
            enable_checkpointing(model, model_cfg, zero_stage, checkpoint_every_n_layers, offload_checkpoints)
            set_input_grads(model, language=False, vision=False)  # trainable embeddings need no hook
        return model
    if peft_cfg.method not in ("lora", "qlora"):
        raise ValueError(f"unknown peft.method {peft_cfg.method!r}")
    from peft import LoraConfig, get_peft_model

    if peft_cfg.method == "qlora" and zero_stage != 3:
        from peft import prepare_model_for_kbit_training

        # k-bit preparation: freezes the base and upcasts its non-quantised fp16/bf16 weights to fp32;
        # checkpointing is switched on below, the same way for every method. Not under ZeRO-3: there the
        # 4-bit weights are stored in the model dtype to be sharded with everything else, and fp32 copies
        # of the other shards would mix dtypes in DeepSpeed's flat buffers (get_peft_model freezes the base).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        enable_checkpointing(model, model_cfg, zero_stage, checkpoint_every_n_layers, offload_checkpoints)
    modules_to_save = list(model_cfg.modules_to_save)
    if peft_cfg.train_projector:
        modules_to_save.append(PROJECTOR)
    config = LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=lora_target_regex(peft_cfg),
        use_rslora=peft_cfg.use_rslora,
        use_dora=peft_cfg.use_dora,
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    # Under ZeRO-3 adapters keep the base dtype: fp32 adapters on bf16 shards trip an assertion in
    # DeepSpeed's defragmentation (see design.md, "Distributed on CPU").
    model = get_peft_model(model, config, autocast_adapter_dtype=zero_stage != 3)
    newline = _image_newline(model)
    if newline is not None:
        newline.requires_grad = peft_cfg.train_image_newline
    if gradient_checkpointing:
        on = model_cfg.input_require_grads
        set_input_grads(model, language=on, vision=on and peft_cfg.train_vision_tower)
    return model


def _image_newline(model):
    for name, p in model.named_parameters():
        if name.endswith(IMAGE_NEWLINE) and not any(s in name for s in _PEFT_SAVED):
            return p
    return None


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


def _numel(p: torch.Tensor) -> int:
    """Logical element count (bitsandbytes packs two 4-bit weights per byte)."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return p.numel()


def trainable_summary(model) -> "OrderedDict[str, tuple[int, int]]":
    """{group: (trainable, total)} parameter counts."""
    out: OrderedDict[str, list[int]] = OrderedDict()
    for name, p in model.named_parameters():
        t = out.setdefault(module_group(name), [0, 0])
        t[1] += _numel(p)
        if p.requires_grad:
            t[0] += _numel(p)
    return OrderedDict((k, (v[0], v[1])) for k, v in out.items())


def describe(model, *, attn_implementation: str = "", reentrant: bool | None = None) -> str:
    """Start-of-run summary: trainable parameters per group, dtypes, quantised modules, checkpointing."""
    from llava_train.model.quantize import quantized_modules

    lines = ["trainable parameters:"]
    total_trainable = total = 0
    for group, (trainable, count) in trainable_summary(model).items():
        lines.append(f"  {group:<15} {trainable:>14,} / {count:>14,}")
        total_trainable += trainable
        total += count
    lines.append(f"  {'total':<15} {total_trainable:>14,} / {total:>14,} ({total_trainable / max(total, 1):.2%})")
    dtypes: dict[str, set[str]] = OrderedDict()
    for name, p in model.named_parameters():
        dtypes.setdefault(module_group(name), set()).add(str(p.dtype).removeprefix("torch."))
    lines.append("dtypes: " + ", ".join(f"{g}={'/'.join(sorted(d))}" for g, d in dtypes.items()))
    quantized = quantized_modules(model)
    if quantized:
        lines.append("quantised: " + ", ".join(f"{g}: {n} x {kind}" for (g, kind), n in quantized.items()))
    else:
        lines.append("quantised: none")
    if attn_implementation:
        lines.append(f"attention: {attn_implementation}")
    if getattr(model, "is_activation_checkpointing", False):
        lines.append(f"gradient checkpointing: on ({'reentrant' if reentrant else 'non-reentrant'})")
    return "\n".join(lines)


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


def unsaved_trainables(model) -> list[str]:
    """Trainable parameters of a PeftModel that peft's adapter file leaves out (bare parameters such as
    LlavaNext's `image_newline`, which `modules_to_save` cannot wrap because it is not a module)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not any(s in n for s in _PEFT_SAVED)]


def save_unsaved_trainables(model, folder: str, *, write: bool = True) -> list[str]:
    """Add the trainable parameters peft leaves out to `<folder>/adapter_model.safetensors`, under their
    PeftModel names: plain `PeftModel.from_pretrained(base, folder)` passes keys it does not manage
    straight to `load_state_dict`, so it restores them. Call on every rank (ZeRO-3 gathers)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return []
    names = unsaved_trainables(model)
    if not names:
        return []
    params = dict(model.named_parameters())
    tensors = {}
    for name in names:
        p = params[name]
        if hasattr(p, "ds_id"):  # ZeRO-3 partitioned parameter: gather the full tensor first
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                tensors[name] = p.detach().clone().cpu()
        else:
            tensors[name] = p.detach().clone().cpu()
    path = os.path.join(folder, ADAPTER_WEIGHTS)
    if write and os.path.exists(path):
        from safetensors.torch import load_file, save_file

        state = load_file(path)
        state.update({k: v.contiguous() for k, v in tensors.items()})
        save_file(state, path, metadata={"format": "pt"})
    return names
