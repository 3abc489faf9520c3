"""Loading a model for inference from whatever a user has: an adapter folder, a merged or base
checkpoint (folder or hub id), a training output folder, or the embedded "tiny" default.

Whether a folder is an adapter is read from its files (`adapter_config.json`), never guessed from
its name. Used by `llava eval`, `llava chat` and `llava export`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from llava_train.config.schema import ModelConfig
from llava_train.model.load import DTYPES, TINY, resolve_checkpoint
from llava_train.model.load import attn_implementation as resolve_attn

ADAPTER_CONFIG = "adapter_config.json"
FINAL = "final"  # the folder `llava train` saves its final model into
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
GENERATION_CONFIG = "generation_config.json"


@dataclass
class Resolved:
    """Where the weights come from."""

    model_dir: str  # the adapter folder, or the full checkpoint
    base: str  # the base checkpoint (same as model_dir when it is not an adapter)
    is_adapter: bool


def resolve(path: str, base_model: str = "", model_cfg: ModelConfig | None = None) -> Resolved:
    """What `path` is: a training output (-> its final/), an adapter (-> its recorded base), a checkpoint."""
    if path == TINY:
        ckpt = resolve_checkpoint(model_cfg or ModelConfig(path=TINY))
        return Resolved(ckpt, ckpt, is_adapter=False)
    folder = Path(path)
    if (folder / FINAL).is_dir() and not (folder / ADAPTER_CONFIG).exists():
        folder = folder / FINAL
    if (folder / ADAPTER_CONFIG).exists():
        recorded = json.loads((folder / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
        base = base_model or recorded
        if Path(base).is_absolute() and not Path(base).exists():
            raise FileNotFoundError(f"{folder}: the adapter's base checkpoint {base} no longer exists; "
                                    "pass base_model=<folder or hub id>")
        return Resolved(str(folder), base, True)
    return Resolved(str(folder) if folder.exists() else path, str(folder) if folder.exists() else path, False)


def load_processor_for(resolved: Resolved, family: str | None = None):
    """The processor saved next to the weights (adapter folders carry theirs), else the base's, with the
    training chat template it was saved with (a folder this project wrote), else `family`'s."""
    from llava_train.model.load import load_processor

    src = resolved.model_dir
    if not any((Path(src) / f).exists() for f in PROCESSOR_FILES):
        src = resolved.base
    return load_processor(src, family, prefer_saved=True)


def load_for_inference(resolved: Resolved, dtype: str = "fp32", attn_implementation: str = "sdpa",
                       device: str | None = None, merge: bool = False):
    """The model in eval mode: base + adapter (a PeftModel, or merged when `merge`), or a checkpoint."""
    from transformers import LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(resolved.base, dtype=DTYPES[dtype],
                                                              attn_implementation=resolve_attn(attn_implementation))
    if resolved.is_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, resolved.model_dir)
        if (Path(resolved.model_dir) / GENERATION_CONFIG).is_file():  # the stop ids training saved
            from transformers import GenerationConfig

            model.base_model.model.generation_config = GenerationConfig.from_pretrained(resolved.model_dir)
        if merge:
            model = model.merge_and_unload()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()
