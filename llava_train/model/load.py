"""Loading a LlavaNext checkpoint (hub id, local folder, or the embedded tiny default) and its processor."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from llava_train.config import ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

TINY = "tiny"


def resolve_checkpoint(cfg: ModelConfig) -> str:
    """The folder or hub id `from_pretrained` gets; `tiny` is materialised on first use."""
    if cfg.path == TINY:
        from llava_train.model.tiny import ensure_tiny_checkpoint

        return str(ensure_tiny_checkpoint(cfg.tiny, cfg.cache_dir))
    return cfg.path


def load_processor(checkpoint: str):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    log.info("image processor backend: %s", type(processor.image_processor).__name__)
    return processor


def attn_implementation(requested: str) -> str:
    """`auto`: flash_attention_2 when the flash-attn package is importable on a CUDA machine, else sdpa."""
    if requested != "auto":
        return requested
    from transformers.utils import is_flash_attn_2_available

    chosen = "flash_attention_2" if torch.cuda.is_available() and is_flash_attn_2_available() else "sdpa"
    print(f"model.attn_implementation=auto -> {chosen}", flush=True)
    return chosen


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
