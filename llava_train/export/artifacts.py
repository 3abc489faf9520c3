"""The exported folders: the adapter (PEFT format) and the merged model (plain transformers)."""

from __future__ import annotations

import shutil
from pathlib import Path

from llava_train.model.inference import Resolved, load_for_inference

# Files a training `final/` folder holds that do not belong in a shared adapter (a pickle of
# TrainingArguments; the resolved training config is exported as YAML instead).
SKIP = {"training_args.bin", "README.md"}
TRAINING_CONFIG = "training_config.yaml"


def write_adapter(resolved: Resolved, processor, train_config_yaml: str, dest: Path) -> Path:
    """PEFT adapter files + processor (tokenizer, image processor, chat template) + training config, into a new
    folder `dest`."""
    dest.mkdir(parents=True)
    for f in Path(resolved.model_dir).iterdir():
        if f.is_file() and f.name not in SKIP:
            shutil.copy2(f, dest / f.name)
    processor.save_pretrained(str(dest))
    if train_config_yaml:
        (dest / TRAINING_CONFIG).write_text(train_config_yaml)
    return dest


def write_merged(resolved: Resolved, processor, dtype: str, max_shard_size: str, train_config_yaml: str,
                 dest: Path) -> Path:
    """Adapter merged into the base (`merge_and_unload`: LoRA deltas folded in, `modules_to_save` such as the
    projector replaced by their trained copies), in `dtype`, as sharded safetensors."""
    from llava_train.model.load import DTYPES

    model = load_for_inference(resolved, "fp32", device="cpu", merge=True)
    model = model.to(DTYPES[dtype])
    model.config.dtype = DTYPES[dtype]
    model.save_pretrained(str(dest), max_shard_size=max_shard_size)
    processor.save_pretrained(str(dest))
    if train_config_yaml:
        (dest / TRAINING_CONFIG).write_text(train_config_yaml)
    return dest
