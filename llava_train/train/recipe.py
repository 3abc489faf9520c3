"""`llava train`: validate -> build data -> build model -> train -> save -> evaluate.

One readable recipe; each step is a small function that takes its config slice.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import TrainingArguments

from llava_train.config import DataConfig, ModelConfig, PeftConfig, TrainJobConfig
from llava_train.data.dataset import ConversationDataset, Encoder
from llava_train.data.images import ImageGeometry
from llava_train.data.index import LazyConversationDataset
from llava_train.data.sampler import batching
from llava_train.data.templates import get_family
from llava_train.evaluate.generate import generate_predictions, metrics
from llava_train.model.adapt import apply_peft, trainable_summary
from llava_train.model.load import load_model, load_processor, resolve_checkpoint
from llava_train.train.trainer import LlavaTrainer, LossRecorder
from llava_train.train.validate import check_train

log = logging.getLogger(__name__)

FINAL = "final"


def run(cfg: TrainJobConfig, output_dir: str) -> dict[str, Any]:
    """Train, save `<output_dir>/final`, evaluate; returns the metrics also written to metrics.json."""
    check_train(cfg)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    checkpoint = resolve_checkpoint(cfg.model)
    print(f"base checkpoint: {checkpoint}", flush=True)
    processor = load_processor(checkpoint)
    train_ds, eval_ds = build_datasets(cfg.data, cfg.model, processor)

    model = build_model(cfg.model, cfg.peft, checkpoint)
    trainer, losses = build_trainer(cfg, model, train_ds, processor, out)
    start = time.time()
    trainer.train()
    train_seconds = time.time() - start

    final = out / FINAL
    trainer.save_model(str(final))
    processor.save_pretrained(str(final))

    results: dict[str, Any] = {
        "train_loss": losses[-1][1] if losses else None,
        "first_train_loss": losses[0][1] if losses else None,
        "loss_history": losses,
        "train_seconds": round(train_seconds, 1),
        "train_samples": len(train_ds),
        "skipped_train_samples": dict(train_ds.skipped.counts),
        "base_checkpoint": checkpoint,
    }
    if eval_ds is not None and cfg.eval.enabled:
        results.update(evaluate(trainer.model, eval_ds, processor.tokenizer, cfg, out))
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def build_datasets(cfg: DataConfig, model_cfg: ModelConfig, processor):
    encoder = Encoder(processor.tokenizer, get_family(model_cfg.family), ImageGeometry.from_processor(processor),
                      max_length=cfg.max_length, overflow=cfg.overflow)
    if cfg.lazy_index:  # very large sets: no tokenisation or image reads at start (data/index.py)
        train = LazyConversationDataset(cfg.train_path, cfg, encoder, processor.image_processor)
    else:
        train = ConversationDataset(cfg.train_path, cfg, encoder, processor.image_processor)
    print(f"train: {len(train)} samples from {cfg.train_path} ({train.skipped.summary()})", flush=True)
    evals = None
    if cfg.eval_path:
        evals = ConversationDataset(cfg.eval_path, cfg, encoder, processor.image_processor)
        print(f"eval: {len(evals)} samples from {cfg.eval_path} ({evals.skipped.summary()})", flush=True)
    return train, evals


def build_model(model_cfg: ModelConfig, peft_cfg: PeftConfig, checkpoint: str):
    model = load_model(model_cfg, checkpoint)
    model = apply_peft(model, peft_cfg, model_cfg)
    print("trainable parameters:", flush=True)
    for group, (trainable, total) in trainable_summary(model).items():
        print(f"  {group:<15} {trainable:>12,} / {total:>12,}", flush=True)
    return model


def training_arguments(cfg: TrainJobConfig, out: Path) -> TrainingArguments:
    t, o = cfg.trainer, cfg.optim
    return TrainingArguments(
        output_dir=str(out),
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        lr_scheduler_type=o.scheduler,
        warmup_steps=o.warmup_ratio,
        max_grad_norm=o.max_grad_norm,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        activation_checkpointing=t.gradient_checkpointing,
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to=[] if t.report_to == "none" else [t.report_to],
        disable_tqdm=t.disable_tqdm,
        remove_unused_columns=False,
        dataloader_num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        bf16=cfg.model.dtype == "bf16",
        fp16=cfg.model.dtype == "fp16",
    )


def build_trainer(cfg: TrainJobConfig, model, train_ds, processor, out: Path):
    recorder = LossRecorder()
    args = training_arguments(cfg, out)
    collator, sampler = batching(cfg.data, train_ds, processor.tokenizer.pad_token_id,
                                 batch_size=args.per_device_train_batch_size, world_size=args.world_size,
                                 seed=cfg.seed)
    trainer = LlavaTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        data_collator=collator,
        callbacks=[recorder],
        optim_cfg=cfg.optim,
        train_batch_sampler=sampler,
        prefetch_factor=cfg.data.prefetch_factor,
    )
    return trainer, recorder.losses


def evaluate(model, eval_ds, tokenizer, cfg: TrainJobConfig, out: Optional[Path]) -> dict[str, Any]:
    preds = generate_predictions(model, eval_ds, tokenizer, batch_size=cfg.eval.batch_size,
                                 max_new_tokens=cfg.eval.max_new_tokens)
    m = metrics(preds)
    if out is not None:
        with open(out / "predictions.jsonl", "w") as f:
            for p in preds:
                f.write(json.dumps({"id": p.id, "question": p.question, "reference": p.reference,
                                    "prediction": p.prediction}) + "\n")
    print(f"eval accuracy (exact match): {m['exact_match']:.1%} on {m['count']} samples", flush=True)
    for p in preds[: cfg.eval.show_samples]:
        mark = "ok " if p.exact else "BAD"
        print(f"  [{mark}] {p.question!r} -> {p.prediction!r} (reference {p.reference!r})", flush=True)
    return {"eval_accuracy": m["exact_match"], "eval_contains_accuracy": m["contains_match"],
            "eval_count": m["count"]}
