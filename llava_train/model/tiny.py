"""The embedded default checkpoint: a small LlavaNext built from config with the real Mistral-7B tokenizer.

Nothing can be downloaded here, so the default model is materialised once into a cache folder with
``save_pretrained`` (model, tokenizer, image processor, chat template) and from then on loaded with
``from_pretrained`` exactly like a real checkpoint. The same seed and geometry give the same weights.
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

# Bump when the way the tiny checkpoint is built changes, so stale caches are not reused.
_BUILD_VERSION = 2

# CLIP's normalisation, as in the llava-v1.6 processors.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def mistral_tokenizer_file() -> Path:
    """Mistral-7B's sentencepiece model as shipped by mistral-common (32000 ids, as in llava-v1.6-mistral)."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: reinstall mistral-common (pip install mistral-common)")
    return path


def build_tokenizer(folder: Path):
    """Mistral-7B tokenizer with `<image>` added as special token 32000, saved into `folder`.

    `legacy` decides whether a space piece follows special tokens; transformers does not write it to
    the saved config and a reload would silently change the ids after `<image>`. We pin
    `legacy=False` and persist it (tests check that a reload keeps every id).
    """
    from transformers import LlamaTokenizer

    src = Path(tempfile.mkdtemp())
    try:
        # Converting needs the file named tokenizer.model inside a folder; constructing the class
        # with vocab_file= builds a 3-token vocabulary instead.
        shutil.copy(mistral_tokenizer_file(), src / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(str(src), add_bos_token=True, add_eos_token=False, legacy=False)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tok.pad_token = tok.unk_token  # llava-v1.6-mistral pads with <unk> (id 0)
    tok.save_pretrained(str(folder))
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update({"legacy": False, "add_bos_token": True, "add_eos_token": False})
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return tok


def _cache_root(cache_dir: str) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("LLAVA_TRAIN_CACHE", "~/.cache/llava-train")).expanduser()


def tiny_checkpoint_dir(cfg: TinyModelConfig, cache_dir: str = "") -> Path:
    """Folder of the tiny checkpoint for this geometry and seed (not necessarily built yet)."""
    key = json.dumps({"v": _BUILD_VERSION, **asdict(cfg)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return _cache_root(cache_dir) / f"tiny-llava-next-{digest}"


def grid_pinpoints(image_size: int) -> list[list[int]]:
    """LLaVA-NeXT's five pinpoints ([336,672],[672,336],[672,672],[1008,336],[336,1008]) scaled to `image_size`."""
    s = image_size
    return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]


def _build(cfg: TinyModelConfig, folder: Path) -> None:
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        MistralConfig,
    )

    from llava_train.data.templates import get_family

    tok = build_tokenizer(folder)
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
    text = MistralConfig(
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
        chat_template=get_family("mistral").chat_template,
    )
    processor.save_pretrained(str(folder))
    # save_pretrained rewrites the tokenizer config: persist `legacy` again.
    cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg.update({"legacy": False, "add_bos_token": True, "add_eos_token": False})
    cfg_path.write_text(json.dumps(tok_cfg, indent=2))
    (folder / "llava_train_tiny.json").write_text(json.dumps(asdict(cfg), indent=2))


def ensure_tiny_checkpoint(cfg: TinyModelConfig, cache_dir: str = "") -> Path:
    """Materialise the tiny checkpoint once (atomically: concurrent ranks never see half a folder)."""
    folder = tiny_checkpoint_dir(cfg, cache_dir)
    if (folder / "llava_train_tiny.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp-"))
    try:
        _build(cfg, tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "llava_train_tiny.json").exists():  # lost a race to a half folder: impossible
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
