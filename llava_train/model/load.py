"""Loading a LlavaNext checkpoint (hub id, local folder, or the embedded tiny default) and its processor."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from llava_train.config import ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

TINY = "tiny"


def resolve_checkpoint(cfg: ModelConfig) -> str:
    """The folder or hub id `from_pretrained` gets; `tiny` is materialised on first use."""
    if cfg.path == TINY:
        from llava_train.model.tiny import ensure_tiny_checkpoint

        return str(ensure_tiny_checkpoint(cfg.tiny, cfg.cache_dir, cfg.family))
    return cfg.path


def load_processor(checkpoint: str, family: Optional[str] = None, *, prefer_saved: bool = False):
    """The checkpoint's processor with the prompt family's *training* chat template set, the one place it
    is set: every folder this project writes saves this processor, so `apply_chat_template`, `llava chat`
    and `pipeline("image-text-to-text")` prompt exactly as training did (the hub templates of the llava-hf
    checkpoints differ from the training formats). `family`: the family to train with (training) or the
    configured fallback; with `prefer_saved` (inference) a template this project saved wins over it."""
    from transformers import AutoProcessor

    from llava_train.data.templates import family_of, get_family, set_training_template

    processor = AutoProcessor.from_pretrained(checkpoint)
    log.info("image processor backend: %s", type(processor.image_processor).__name__)
    saved = family_of(getattr(processor, "chat_template", None))
    name = (saved or family) if prefer_saved else (family or saved)
    if saved and family and saved != family:
        log.warning("%s was trained with the %r prompt family but model.family=%s; using %r", checkpoint, saved,
                    family, name)
    if name:
        set_training_template(processor, get_family(name))
    return processor


def attn_implementation(requested: str) -> str:
    """`auto`: flash_attention_2 when the flash-attn package is importable on a CUDA machine, else sdpa."""
    if requested != "auto":
        return requested
    from transformers.utils import is_flash_attn_2_available

    chosen = "flash_attention_2" if torch.cuda.is_available() and is_flash_attn_2_available() else "sdpa"
    log.info(f"model.attn_implementation=auto -> {chosen}")
    return chosen


def processor_family(processor) -> Optional[str]:
    """The prompt family whose training template the processor carries (None: another template)."""
    from llava_train.data.templates import family_of

    return family_of(getattr(processor, "chat_template", None))


def stop_token_ids(tokenizer, family) -> list[int]:
    """The ids generation must stop on: the tokenizer's EOS and the family's end-of-turn token."""
    ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(family.eot)]
    return list(dict.fromkeys(i for i in ids if i is not None and i != tokenizer.unk_token_id))


def set_generation_stop(generation_config, tokenizer, family) -> None:
    """Add the family's stop ids to `generation_config.eos_token_id` (the ids already there are kept), so
    the `generation_config.json` saved with the model stops on the end-of-turn token (llama3 `<|eot_id|>`,
    chatml/qwen `<|im_end|>`, mistral/vicuna `</s>`)."""
    current = generation_config.eos_token_id
    current = list(current) if isinstance(current, (list, tuple)) else ([current] if current is not None else [])
    ids = list(dict.fromkeys([*stop_token_ids(tokenizer, family), *current]))
    generation_config.eos_token_id = ids if len(ids) > 1 else ids[0]
    if generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id


def load_model(cfg: ModelConfig, checkpoint: str, *, quantization_config=None):
    from transformers import LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(
        checkpoint,
        dtype=DTYPES[cfg.dtype],
        attn_implementation=attn_implementation(cfg.attn_implementation),
        quantization_config=quantization_config,
    )
    return model


def checkpoint_config(checkpoint: str):
    """The checkpoint's `LlavaNextConfig` (config.json only, no weights). A released llava-hf hub id is
    read from the local hub cache when it is there, else from the tabled copy in
    `llava_train.model.catalog` (no network wait on offline machines); anything else with AutoConfig."""
    from transformers import AutoConfig

    from llava_train.model.catalog import known_config

    known = known_config(checkpoint)
    if known is None or Path(checkpoint).is_dir():
        return AutoConfig.from_pretrained(checkpoint)
    try:
        return AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    except OSError:
        log.info("%s: config.json not in the hub cache, using the tabled config (llava_train/model/catalog.py)",
                 checkpoint)
        return known


def meta_model(config):
    """The model's module tree on the meta device: every name and type, no memory, no weights."""
    from transformers import LlavaNextForConditionalGeneration

    with torch.device("meta"):
        return LlavaNextForConditionalGeneration(config)
