"""`llava eval`: generation eval of an adapter, a merged model or a base model on an eval file.

Writes `<output_dir>/predictions.jsonl` (id, question, reference, prediction) and `metrics.json`
(exact match after normalisation, contains-match, per question type when the data tags it, count).
Prompts are rendered exactly as in training (same prompt family, same image-token expansion), and the
batching is the same left-padded generation training's final eval uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llava_train.config.jobs import EvalJobConfig
from llava_train.config.schema import DataConfig
from llava_train.data.dataset import ConversationDataset
from llava_train.data.encoder import Encoder
from llava_train.data.images import ImageGeometry
from llava_train.data.templates import get_family
from llava_train.evaluate.generate import generate_predictions, metrics, write_predictions
from llava_train.model.inference import load_for_inference, load_processor_for, resolve
from llava_train.model.load import processor_family, set_generation_stop


def run(cfg: EvalJobConfig, output_dir: str) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = resolve(cfg.model.path, cfg.base_model, cfg.model)
    kind = "adapter" if resolved.is_adapter else "checkpoint"
    print(f"model: {resolved.model_dir} ({kind}; base {resolved.base})", flush=True)
    processor = load_processor_for(resolved, cfg.model.family)
    family = get_family(processor_family(processor) or cfg.model.family)  # the family the model was trained with
    model = load_for_inference(resolved, cfg.model.dtype, cfg.model.attn_implementation)
    set_generation_stop(model.generation_config, processor.tokenizer, family)

    encoder = Encoder(processor.tokenizer, family, ImageGeometry.from_processor(processor),
                      max_length=cfg.data.max_length, overflow="skip")
    data_cfg = DataConfig(train_path=cfg.data.path, image_root=cfg.data.image_root, max_length=cfg.data.max_length,
                          on_error=cfg.data.on_error)
    ds = ConversationDataset(cfg.data.path, data_cfg, encoder, processor.image_processor)
    n = len(ds) if cfg.data.max_samples is None else min(cfg.data.max_samples, len(ds))
    print(f"eval: {n} samples from {cfg.data.path} ({ds.skipped.summary()})", flush=True)

    e = cfg.eval
    preds = generate_predictions(model, ds, processor.tokenizer, batch_size=e.batch_size,
                                 max_new_tokens=e.max_new_tokens, indices=range(n), do_sample=e.do_sample,
                                 temperature=e.temperature, top_p=e.top_p)
    m = metrics(preds)
    m.update({"model": resolved.model_dir, "base_model": resolved.base, "adapter": resolved.is_adapter,
              "eval_path": cfg.data.path, "skipped": dict(ds.skipped.counts)})
    write_predictions(preds, out / "predictions.jsonl")
    (out / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
    print(f"eval accuracy (exact match): {m['exact_match']:.1%} on {m['count']} samples "
          f"(contains: {m['contains_match']:.1%})", flush=True)
    for t, acc in m.get("per_question_type", {}).items():
        print(f"  {t:<12} {acc:.1%}", flush=True)
    for p in preds[: e.show_samples]:
        mark = "ok " if p.exact else "BAD"
        print(f"  [{mark}] {p.question!r} -> {p.prediction!r} (reference {p.reference!r})", flush=True)
    print(f"wrote {out / 'predictions.jsonl'} and {out / 'metrics.json'}", flush=True)
    return m
