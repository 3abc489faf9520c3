"""`llava preview`: samples rendered as a person wants to see them.

Each sample shows the exact training text: trained spans (replies and their end-of-turn token)
highlighted in colour on a terminal, or between `[[` and `]]` otherwise; each image's tokens collapsed
as `<image x2340>`; and per-sample token counts. `preview.output=FILE.jsonl` also writes one JSON
object per sample: id, input_ids, labels, image_sizes ([height, width] per image), num_image_tokens.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional, TextIO

from llava_train.config import DataConfig, ModelConfig
from llava_train.config.jobs import PreviewJobConfig
from llava_train.constants import IGNORE_INDEX
from llava_train.data.dataset import SkipReport, as_sources, iter_encoded
from llava_train.data.encoder import Encoded, Encoder
from llava_train.data.formats import Conversation
from llava_train.data.images import ImageGeometry
from llava_train.data.templates import get_family

TRAINED_ON, TRAINED_OFF = "\x1b[1;32m", "\x1b[0m"  # bold green on a terminal
OPEN, CLOSE = "[[", "]]"


def load_encoder(model_cfg: ModelConfig, data_cfg: DataConfig, *, max_length: int | None = None):
    """The processor of `model_cfg`'s checkpoint and an `Encoder` for it (no model weights loaded)."""
    from llava_train.model.load import load_processor, resolve_checkpoint

    processor = load_processor(resolve_checkpoint(model_cfg), model_cfg.family)
    if max_length is not None:
        data_cfg = replace(data_cfg, max_length=max_length)
    encoder = Encoder.from_config(processor.tokenizer, get_family(model_cfg.family),
                                  ImageGeometry.from_processor(processor), data_cfg)
    return processor, encoder


@dataclass
class Sample:
    conv: Conversation
    sizes: list[tuple[int, int]]
    enc: Encoded


def iter_samples(path, cfg: DataConfig, encoder: Encoder, skipped: SkipReport) -> Iterator[Sample]:
    """Encoded samples of a source (or `data.sources`) in order; bad ones go to `skipped` or raise
    as the config says."""
    for source in as_sources(path, cfg):
        for conv, sizes, enc in iter_encoded(source, cfg, encoder, skipped):
            yield Sample(conv, sizes, enc)


def render(enc: Encoded, tokenizer, image_token_id: int, *, color: bool) -> str:
    """The training text of one encoded sample, trained spans marked, image tokens collapsed."""
    runs: list[tuple[str, list[int]]] = []  # (kind, ids): kind is image | trained | prompt
    for tid, lab in zip(enc.input_ids, enc.labels):
        kind = "image" if tid == image_token_id else ("trained" if lab != IGNORE_INDEX else "prompt")
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(tid)
        else:
            runs.append((kind, [tid]))
    out, context = [], []  # context: text ids before a run, so leading spaces decode correctly
    for kind, ids in runs:
        if kind == "image":
            out.append(f"<image x{len(ids)}>")
            continue
        ctx = context[-8:]
        before = tokenizer.decode(ctx, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        text = tokenizer.decode(ctx + ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        text = text[len(before):] if text.startswith(before) else tokenizer.decode(ids, skip_special_tokens=False)
        context += ids
        if kind == "trained":
            text = f"{TRAINED_ON}{text}{TRAINED_OFF}" if color else f"{OPEN}{text}{CLOSE}"
        out.append(text)
    return "".join(out)


def counts(enc: Encoded) -> dict[str, int]:
    image = sum(enc.image_tokens)
    trained = sum(1 for t in enc.labels if t != IGNORE_INDEX)
    return {"tokens": len(enc.input_ids), "image_tokens": image, "text_tokens": len(enc.input_ids) - image,
            "trained_tokens": trained}


def record(sample: Sample) -> dict:
    """The JSON object `preview.output` writes for a sample."""
    enc = sample.enc
    return {
        "id": sample.conv.id,
        "source": sample.conv.source,
        "index": sample.conv.index,
        "input_ids": enc.input_ids,
        "labels": enc.labels,
        "image_sizes": [list(s) for s in sample.sizes[: enc.num_images]],
        "num_image_tokens": enc.image_tokens,
    }


def preview(cfg: PreviewJobConfig, out: Optional[TextIO] = None) -> list[dict]:
    """Print `preview.num_samples` samples from `preview.start`; returns their records."""
    out = out or sys.stdout
    p = cfg.preview
    path = cfg.data.train_path if p.split == "train" else cfg.data.eval_path
    if p.split == "eval" and not path:
        raise ValueError("preview.split=eval needs data.eval_path")
    processor, encoder = load_encoder(cfg.model, cfg.data)
    tok = processor.tokenizer
    color = p.color == "always" or (p.color == "auto" and out.isatty())
    skipped = SkipReport()
    records = []
    for k, sample in enumerate(iter_samples(path, cfg.data, encoder, skipped)):
        if k < p.start:
            continue
        if len(records) >= p.num_samples:
            break
        c = counts(sample.enc)
        sizes = ", ".join(f"{h}x{w}" for h, w in sample.sizes[: sample.enc.num_images]) or "none"
        head = (f"=== sample {k}  id={sample.conv.id}  tokens={c['tokens']} (text {c['text_tokens']}, image "
                f"{c['image_tokens']}, trained {c['trained_tokens']})  images={sizes} (h x w) ===")
        print(head, file=out)
        print(render(sample.enc, tok, encoder.image_token_id, color=color), file=out)
        print(file=out)
        records.append(record(sample))
    legend = f"{TRAINED_ON}trained{TRAINED_OFF}" if color else f"{OPEN}trained{CLOSE}"
    print(f"{len(records)} sample(s) shown; {legend} spans are learned, everything else has label -100."
          + (f" Skipped on the way: {skipped.summary()}" if skipped.total else ""), file=out)
    if p.output:
        Path(p.output).parent.mkdir(parents=True, exist_ok=True)
        with open(p.output, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {len(records)} sample(s) to {p.output}", file=out)
    return records
