"""What gets trained: LoRA/QLoRA on the language model or full fine-tuning (PEFT wrapping, freezing) and
gradient checkpointing. Targets are in targets.py, the summary in summary.py, optimizer groups in
param_groups.py, what peft's adapter file leaves out in adapter_files.py."""

from __future__ import annotations

from llava_train.config import ModelConfig, PeftConfig
from llava_train.model.adapter_files import PEFT_SAVED
from llava_train.model.targets import IMAGE_NEWLINE, PROJECTOR, VISION_PREFIX, lora_target_regex


def checkpoint_reentrant(model_cfg: ModelConfig, zero_stage: int) -> bool:
    """Non-reentrant checkpointing, except under ZeRO-3.

    Workaround for huggingface/transformers#47254: under ZeRO-3, non-reentrant recomputation sees frozen
    parameters already re-partitioned to shape [0] and raises CheckpointError. Fixed in DeepSpeed by
    deepspeedai/DeepSpeed#8148 (merged 2026-07); can go (non-reentrant everywhere) once the minimum
    DeepSpeed contains it and tests/train/test_distributed.py passes with model.checkpoint_reentrant=false."""
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
    # transformers keeps handles only to the latest set). Workaround, no upstream issue: can go when
    # enable_input_require_grads is idempotent and skips frozen sub-models (transformers 5.24 is neither)
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
        if name.endswith(IMAGE_NEWLINE) and not any(s in name for s in PEFT_SAVED):
            return p
    return None
