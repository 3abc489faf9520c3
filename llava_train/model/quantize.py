"""QLoRA's base: bitsandbytes 4-bit (nf4, double quantisation) or 8-bit language-model linears, with the
vision tower, projector and lm_head kept in full precision by full-prefix skip names."""

from __future__ import annotations

import torch

from llava_train.config import ModelConfig, PeftConfig

STORAGE_DTYPES = {"uint8": torch.uint8, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The parts of LlavaNext that must stay unquantised (trained fully or LoRA'd in full precision).
MUST_SKIP = ("model.vision_tower", "model.multi_modal_projector")


def compute_dtype(peft_cfg: PeftConfig, model_cfg: ModelConfig) -> str:
    return peft_cfg.compute_dtype or model_cfg.dtype


def quantization_config(peft_cfg: PeftConfig, model_cfg: ModelConfig):
    """The `BitsAndBytesConfig` for peft.method=qlora, else None."""
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
        bnb_4bit_quant_storage=STORAGE_DTYPES[peft_cfg.quant_storage],
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
