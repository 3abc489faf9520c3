"""QLoRA's base: bitsandbytes 4-bit (nf4, double quantisation) or 8-bit language-model linears, with the
vision tower, projector and lm_head kept in full precision by full-prefix skip names."""

from __future__ import annotations

import torch

from llava_train.config import ModelConfig, PeftConfig

STORAGE_DTYPES = {"uint8": torch.uint8, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
AUTO_STORAGE = "auto"
# The parts of LlavaNext that must stay unquantised (trained fully or LoRA'd in full precision).
MUST_SKIP = ("model.vision_tower", "model.multi_modal_projector")


def compute_dtype(peft_cfg: PeftConfig, model_cfg: ModelConfig) -> str:
    return peft_cfg.compute_dtype or model_cfg.dtype


def storage_dtype(peft_cfg: PeftConfig, model_cfg: ModelConfig, *, sharded: bool) -> str:
    """peft.quant_storage resolved. `auto`: the model dtype when the weights are sharded (ZeRO-3), so the
    packed 4-bit weights are partitioned like every other tensor of that dtype (PEFT's "QLoRA and DeepSpeed
    with ZeRO3" recipe, LLaMA-Factory's quantization.py); uint8 (bitsandbytes' default) otherwise."""
    if peft_cfg.quant_storage != AUTO_STORAGE:
        return peft_cfg.quant_storage
    return model_cfg.dtype if sharded else "uint8"


def quantization_config(peft_cfg: PeftConfig, model_cfg: ModelConfig, *, sharded: bool = False):
    """The `BitsAndBytesConfig` for peft.method=qlora, else None. `sharded`: the weights will be partitioned
    across ranks (ZeRO-3), see `storage_dtype`."""
    if peft_cfg.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    from llava_train.model.load import DTYPES

    skip = list(peft_cfg.quant_skip_modules)
    if peft_cfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=peft_cfg.quant_type,
        bnb_4bit_use_double_quant=peft_cfg.double_quant,
        bnb_4bit_compute_dtype=DTYPES[compute_dtype(peft_cfg, model_cfg)],
        bnb_4bit_quant_storage=STORAGE_DTYPES[storage_dtype(peft_cfg, model_cfg, sharded=sharded)],
        llm_int8_skip_modules=skip,
    )


def skip_problems(peft_cfg: PeftConfig, module_names: list[str]) -> list[str]:
    """Skip names that match nothing (transformers 5 matches `llm_int8_skip_modules` anchored at the start of
    the full name, huggingface/transformers#42455 and #42711: short names match nothing), and required
    parts that would be quantised."""
    problems = []
    for entry in peft_cfg.quant_skip_modules:
        if not any(n == entry or n.startswith(entry + ".") for n in module_names):
            problems.append(f"peft.quant_skip_modules entry {entry!r} is no full module-name prefix of this model "
                            f"(use full prefixes such as {list(MUST_SKIP)})")
    for part in MUST_SKIP:
        if any(n == part or n.startswith(part + ".") for n in module_names) and not any(
                part == e or part.startswith(e + ".") for e in peft_cfg.quant_skip_modules):
            problems.append(f"peft.quant_skip_modules does not cover {part}: it would be quantised")
    return problems


def is_quantized_linear(module: torch.nn.Module) -> str:
    """'4bit' / '8bit' for bitsandbytes linears (a peft LoRA layer's base_layer is one), else ''."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return ""
    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit"
    return ""


def quantized_bytes(param) -> tuple[int, list[torch.Tensor]]:
    """(packed 4-bit weight bytes, quantisation-state tensors) of a bitsandbytes 4-bit weight, (0, []) for
    anything else. The packed bytes are half the logical element count whatever the storage dtype; the
    state (per-block absmax; with double quantisation the nested absmax, and the code tables) is a Python
    attribute of the parameter, so ZeRO-3 does not partition it: every rank holds all of it."""
    state = getattr(param, "quant_state", None)
    if state is None:
        return 0, []
    tensors = [state.absmax, state.code]
    if getattr(state, "state2", None) is not None:
        tensors += [state.state2.absmax, state.state2.code]
    numel = getattr(param, "ds_numel", None)  # a ZeRO-3 parameter's own data is its (maybe empty) shard
    numel = param.numel() if numel is None else numel
    return numel * param.element_size(), [t for t in tensors if isinstance(t, torch.Tensor)]
