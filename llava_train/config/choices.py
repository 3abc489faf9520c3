"""Closed choices of the config schema, as enums: Hydra refuses any other value at composition."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A closed choice (Hydra refuses other values at composition). Member names equal their values, so a
    choice compares, hashes, prints and serialises as its plain string."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)


Family = Choice("Family", {n: n for n in ("mistral", "vicuna", "chatml", "llama3", "qwen")})  # prompt formats
DType = Choice("DType", {n: n for n in ("fp32", "bf16", "fp16")})
Attention = Choice("Attention", {n: n for n in ("sdpa", "eager", "flash_attention_2", "auto")})
Method = Choice("Method", {n: n for n in ("lora", "qlora", "full")})
QuantType = Choice("QuantType", {n: n for n in ("nf4", "fp4")})
QuantStorage = Choice("QuantStorage", {n: n for n in ("auto", "uint8", "bf16", "fp16", "fp32")})
Overflow = Choice("Overflow", {n: n for n in ("drop_turns", "skip", "error")})
OnError = Choice("OnError", {n: n for n in ("error", "skip")})
DataFormat = Choice("DataFormat", {n: n for n in ("auto", "llava", "messages")})
DataOrder = Choice("DataOrder", {n: n for n in ("random", "sequential")})
# Trackers, each HF Trainer's own integration (TrainingArguments.report_to); none: no tracker.
Tracker = Choice("Tracker", {n: n for n in ("none", "wandb", "tensorboard", "mlflow", "trackio")})
WandbMode = Choice("WandbMode", {n: n for n in ("auto", "online", "offline")})
Split = Choice("Split", {n: n for n in ("train", "eval")})
Color = Choice("Color", {n: n for n in ("auto", "always", "never")})
ExportDType = Choice("ExportDType", {n: n for n in ("auto", "fp32", "bf16", "fp16")})
ExportPush = Choice("ExportPush", {n: n for n in ("merged", "adapter")})


class SpecialTokensInText(str, Enum):
    """How message text that spells a special token (`</s>`, `<|im_end|>`...) is tokenised."""

    text = "text"  # as plain text (the tokenizer's split_special_tokens): data cannot inject control tokens
    parse = "parse"  # as the control token it spells (the tokenizer's default; the old behaviour)


class ImagePlacement(str, Enum):
    """Where a turn's single `<image>` goes."""

    front = "front"  # moved to the front of its turn, `<image>\n` + text (LLaVA's preprocess_multimodal)
    as_written = "as_written"  # left where the data puts it


class ImageSizes(str, Enum):
    """Where the length plan gets each image's size (data/imagesizes.py)."""

    # read once at start from each image's header, no pixel decoded (JSON/JSONL: the files, in parallel, cached
    # as <name>.imagesizes.npz; HF/Arrow: the embedded images' first bytes, in place)
    headers = "headers"
    assumed = "assumed"  # every image counted at data.lazy_image_hw (no file is opened at start)
