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
from llava_train.model.adapt import apply_peft, checkpoint_reentrant, describe
from llava_train.model.load import load_model, load_processor, resolve_checkpoint
from llava_train.model.quantize import quantization_config
from llava_train.model.speed import apply_liger, compile_language_layers, resolve_tf32
from llava_train.train.callbacks import attach_callbacks
from llava_train.train.distributed import (
    distributed_arguments,
    init_distributed,
    is_main_process,
    main_process_first,
    teardown,
)
from llava_train.train.resume import CheckpointSealer, Preemption, drop_unsealed, resolve_resume
from llava_train.train.trainer import LlavaTrainer, LossRecorder
from llava_train.train.validate import check_train

log = logging.getLogger(__name__)

FINAL = "final"


def run(cfg: TrainJobConfig, output_dir: str, callbacks=()) -> dict[str, Any]:
    """Train, save `<output_dir>/final`, evaluate; returns the metrics also written to metrics.json.

    `callbacks`: extra `TrainerCallback`s (e.g. a library user's own) added to the trainer."""
    check_train(cfg)
    init_distributed(cfg.deepspeed)  # before TrainingArguments (ZeRO-3 batch check, partitioned init)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    with main_process_first():
        checkpoint = resolve_checkpoint(cfg.model)
    print(f"base checkpoint: {checkpoint}", flush=True)
    processor = load_processor(checkpoint)
    train_ds, eval_ds = build_datasets(cfg.data, cfg.model, processor)

    args = training_arguments(cfg, out)  # before the model: under ZeRO-3 it is built partitioned
    model = build_model(cfg.model, cfg.peft, checkpoint, gradient_checkpointing=cfg.trainer.gradient_checkpointing,
                        zero_stage=cfg.deepspeed.stage, seed=cfg.seed,
                        checkpoint_every_n_layers=cfg.trainer.checkpoint_every_n_layers,
                        offload_checkpoints=cfg.trainer.activation_offloading)
    preemption = Preemption(cfg.trainer.preemption_signals)
    trainer, losses = build_trainer(cfg, model, train_ds, processor, out, args=args,
                                    callbacks=[CheckpointSealer(), preemption, *callbacks])
    tracking = attach_callbacks(trainer, cfg, eval_ds, processor.tokenizer, out)
    resume_from = resolve_resume(cfg.trainer.resume, out)
    if is_main_process():
        drop_unsealed(out, resume_from)
    if resume_from:
        print(f"resuming from {resume_from}", flush=True)
    start = time.time()
    train_output = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.time() - start
    if preemption.preempted:
        print(f"preempted: checkpoint saved to {preemption.checkpoint}; resume with trainer.resume=auto", flush=True)
        teardown()
        return {"preempted": True, "checkpoint": preemption.checkpoint, "loss_history": losses}

    final = out / FINAL
    trainer.save_model(str(final))
    if is_main_process():
        processor.save_pretrained(str(final))

    results: dict[str, Any] = {
        "train_loss": losses[-1][1] if losses else None,
        "first_train_loss": losses[0][1] if losses else None,
        "loss_history": losses,
        "train_seconds": round(train_seconds, 1),
        "train_samples": len(train_ds),
        "skipped_train_samples": dict(train_ds.skipped.counts),
        "base_checkpoint": checkpoint,
        "train_samples_per_second": train_output.metrics.get("train_samples_per_second"),
        "world_size": args.world_size,
    }
    if eval_ds is not None and cfg.eval.enabled:
        # every rank generates (ZeRO-3 gathers weights collectively); rank 0 writes
        results.update(evaluate(trainer.model, eval_ds, processor.tokenizer, cfg, out if is_main_process() else None))
    tracking.finish(results, trainer.state.global_step, rows=cfg.eval.table_rows)
    if is_main_process():
        (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    teardown()
    return results


def build_datasets(cfg: DataConfig, model_cfg: ModelConfig, processor):
    encoder = Encoder.from_config(processor.tokenizer, get_family(model_cfg.family),
                                  ImageGeometry.from_processor(processor), cfg)
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


def build_model(model_cfg: ModelConfig, peft_cfg: PeftConfig, checkpoint: str, *,
                gradient_checkpointing: bool = False, zero_stage: int = 0, seed=None,
                checkpoint_every_n_layers: int = 1, offload_checkpoints: bool = False):
    model = load_model(model_cfg, checkpoint, quantization_config=quantization_config(peft_cfg, model_cfg))
    if model_cfg.liger:
        print(f"liger: {apply_liger(model)} on the language model", flush=True)
    if seed is not None:
        # adapter init from the seed alone: loading draws random numbers under ZeRO-3's partitioned init
        # (and when the tiny base is materialised) but not otherwise
        torch.manual_seed(seed)
    model = apply_peft(model, peft_cfg, model_cfg, gradient_checkpointing=gradient_checkpointing,
                       zero_stage=zero_stage, checkpoint_every_n_layers=checkpoint_every_n_layers,
                       offload_checkpoints=offload_checkpoints)
    if model_cfg.compile:  # after peft: the compiled blocks include their LoRA layers
        n = compile_language_layers(model, model_cfg.compile_backend)
        print(f"compile: {n} language-model blocks ({model_cfg.compile_backend})", flush=True)
    print(f"method: {peft_cfg.method}, model.dtype: {model_cfg.dtype}", flush=True)
    print(describe(model, attn_implementation=model_cfg.attn_implementation,
                   reentrant=checkpoint_reentrant(model_cfg, zero_stage)), flush=True)
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
        activation_checkpointing=False,  # build_model switches it on (reentrant choice, input grads)
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to=[] if t.report_to == "none" else [t.report_to],
        disable_tqdm=t.disable_tqdm,
        remove_unused_columns=False,
        dataloader_num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        tf32=resolve_tf32(t.tf32),
        bf16=cfg.model.dtype == "bf16",
        fp16=cfg.model.dtype == "fp16",
        **distributed_arguments(cfg.deepspeed),
        train_sampling_strategy=t.data_order,
    )


def build_trainer(cfg: TrainJobConfig, model, train_ds, processor, out: Path, args=None, callbacks=()):
    recorder = LossRecorder()
    args = args if args is not None else training_arguments(cfg, out)
    collator, sampler = batching(cfg.data, train_ds, processor.tokenizer.pad_token_id,
                                 batch_size=args.per_device_train_batch_size, world_size=args.world_size,
                                 seed=cfg.seed)
    trainer = LlavaTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        data_collator=collator,
        callbacks=[recorder, *callbacks],
        optim_cfg=cfg.optim,
        train_batch_sampler=sampler,
        prefetch_factor=cfg.data.prefetch_factor,
        loss_chunk_tokens=cfg.model.loss_chunk_tokens,
        liger_loss=cfg.model.liger,
        offload_activations=cfg.trainer.activation_offloading and not cfg.trainer.gradient_checkpointing,
        deepspeed_cfg=cfg.deepspeed,
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
