"""Loading a LlavaNext checkpoint (hub id, local folder, or the embedded tiny default) and its processor."""

from __future__ import annotations

import logging

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


def load_model(cfg: ModelConfig, checkpoint: str, *, quantization_config=None):
    from transformers import LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(
        checkpoint,
        dtype=DTYPES[cfg.dtype],
        attn_implementation=cfg.attn_implementation,
        quantization_config=quantization_config,
    )
    return model


def checkpoint_config(checkpoint: str):
    """The checkpoint's `LlavaNextConfig` (config.json only, no weights)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(checkpoint)


def meta_model(config):
    """The model's module tree on the meta device: every name and type, no memory, no weights."""
    from transformers import LlavaNextForConditionalGeneration

    with torch.device("meta"):
        return LlavaNextForConditionalGeneration(config)
