"""What peft's adapter file leaves out (bare parameters such as `image_newline`), added to it on save."""

from __future__ import annotations

import os

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Name pieces of what peft itself saves in an adapter (tuner weights, modules_to_save copies, trainable tokens).
PEFT_SAVED = ("lora_", ".modules_to_save.", ".token_adapter.")


def unsaved_trainables(model) -> list[str]:
    """Trainable parameters of a PeftModel that peft's adapter file leaves out (bare parameters such as
    LlavaNext's `image_newline`, which `modules_to_save` cannot wrap because it is not a module)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not any(s in n for s in PEFT_SAVED)]


def save_unsaved_trainables(model, folder: str, *, write: bool = True) -> list[str]:
    """Add the trainable parameters peft leaves out to `<folder>/adapter_model.safetensors`, under their
    PeftModel names: plain `PeftModel.from_pretrained(base, folder)` passes keys it does not manage
    straight to `load_state_dict`, so it restores them. Call on every rank (ZeRO-3 gathers).

    Workaround, no upstream issue: peft (0.21) saves tuner weights and `modules_to_save` wrappers only
    (huggingface/peft#2099 covers parameters of wrapped modules, not a model's own bare parameter). Can go
    if peft saves trainable bare parameters or LlavaNext moves `image_newline` into a submodule."""
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
        elif hasattr(p, "full_tensor"):  # FSDP2 shard (a DTensor): all-gather (collective, every rank)
            tensors[name] = p.detach().full_tensor().clone().cpu()
        else:
            tensors[name] = p.detach().clone().cpu()
    path = os.path.join(folder, ADAPTER_WEIGHTS)
    if write and os.path.exists(path):
        from safetensors.torch import load_file, save_file

        state = load_file(path)
        state.update({k: v.contiguous() for k, v in tensors.items()})
        save_file(state, path, metadata={"format": "pt"})
    return names
