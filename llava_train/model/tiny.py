"""The embedded default checkpoint: a small LlavaNext built from config with a real tokenizer.

`model.family` picks the tokenizer and language-model architecture of the family's checkpoints
(mistral: Mistral-7B's tokenizer and MistralConfig; vicuna: Llama-2's, LlamaConfig; llama3: Llama-3's,
LlamaConfig; qwen: Qwen's, Qwen2Config; chatml: a stand-in tokenizer, LlamaConfig as Yi), see
`model/tokenizers.py`.

Nothing can be downloaded here, so the default model is materialised once into a cache folder with
``save_pretrained`` (model, tokenizer, image processor, the family's training chat template) and from then
on loaded with ``from_pretrained`` exactly like a real checkpoint. The same seed, geometry and family give
the same weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from llava_train.config import TinyModelConfig
from llava_train.constants import IMAGE_TOKEN
from llava_train.model.tokenizers import persist_tokenizer_settings

# Bump when the way the tiny checkpoint is built changes, so stale caches are not reused.
_BUILD_VERSION = 3

# CLIP's normalisation, as in the llava-v1.6 processors.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tokenizer(folder: Path, family: str = "mistral"):
    """The family's real tokenizer (`model/tokenizers.py`; chatml: a stand-in) with `<image>` added as a
    special token, saved into `folder` (`legacy` persisted: a reload keeps every id)."""
    from llava_train.model.tokenizers import build_family_tokenizer, save_tokenizer

    tok = build_family_tokenizer(family)
    save_tokenizer(tok, folder)
    return tok


def _cache_root(cache_dir: str) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("LLAVA_TRAIN_CACHE", "~/.cache/llava-train")).expanduser()


def tiny_checkpoint_dir(cfg: TinyModelConfig, cache_dir: str = "", family: str = "mistral") -> Path:
    """Folder of the tiny checkpoint for this geometry, seed and family (not necessarily built yet)."""
    key = json.dumps({"v": _BUILD_VERSION, "family": family, **asdict(cfg)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    name = "tiny-llava-next" if family == "mistral" else f"tiny-llava-next-{family}"
    return _cache_root(cache_dir) / f"{name}-{digest}"


def grid_pinpoints(image_size: int) -> list[list[int]]:
    """LLaVA-NeXT's five pinpoints ([336,672],[672,336],[672,672],[1008,336],[336,1008]) scaled to `image_size`."""
    s = image_size
    return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]


def _text_config_class(family: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {"mistral": MistralConfig, "qwen": Qwen2Config}.get(family, LlamaConfig)


def _build(cfg: TinyModelConfig, folder: Path, family: str) -> None:
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from llava_train.data.templates import get_family, set_training_template

    tok = build_tokenizer(folder, family)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=4 * cfg.vision_hidden_size,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden_size,
    )
    text = _text_config_class(family)(
        vocab_size=len(tok),
        hidden_size=cfg.text_hidden_size,
        intermediate_size=cfg.text_intermediate_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    pins = grid_pinpoints(cfg.image_size)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_grid_pinpoints=pins,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    model = LlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(folder))
    # The PIL backend is always available; with torchvision installed, AutoProcessor loads the
    # torchvision backend from the same saved config (same patch counts).
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_grid_pinpoints=pins,
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
    )
    set_training_template(processor, get_family(family))
    processor.save_pretrained(str(folder))
    # save_pretrained rewrites the tokenizer config: persist `legacy` again.
    persist_tokenizer_settings(tok, folder)
    (folder / "llava_train_tiny.json").write_text(json.dumps({**asdict(cfg), "family": family}, indent=2))


def ensure_tiny_checkpoint(cfg: TinyModelConfig, cache_dir: str = "", family: str = "mistral") -> Path:
    """Materialise the tiny checkpoint once (atomically: concurrent ranks never see half a folder)."""
    folder = tiny_checkpoint_dir(cfg, cache_dir, family)
    if (folder / "llava_train_tiny.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp-"))
    try:
        _build(cfg, tmp, family)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "llava_train_tiny.json").exists():  # lost a race to a half folder: impossible
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
