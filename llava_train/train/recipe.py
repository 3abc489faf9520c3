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
from llava_train.config.hf_args import hf_arguments
from llava_train.data.dataset import ConversationDataset, as_sources
from llava_train.data.encoder import Encoder
from llava_train.data.images import ImageGeometry
from llava_train.data.index import LazyConversationDataset
from llava_train.data.sampler import batching, num_workers
from llava_train.data.templates import get_family
from llava_train.evaluate.generate import generate_predictions, metrics
from llava_train.files import write_json_atomic
from llava_train.model.adapt import apply_peft, checkpoint_reentrant
from llava_train.model.load import load_model, load_processor, resolve_checkpoint, set_generation_stop
from llava_train.model.quantize import quantization_config
from llava_train.model.speed import apply_liger, compile_language_layers, resolve_tf32
from llava_train.model.summary import describe
from llava_train.ranks import is_main_process, log_on_main_process_only, rank, world_size
from llava_train.train.callbacks import attach_callbacks, in_training_eval_set, report_to, run_name
from llava_train.train.distributed import (
    ShardReport,
    distributed_arguments,
    gather_for_export,
    init_distributed,
    main_process_first,
    teardown,
)
from llava_train.train.identity import RunIdentity
from llava_train.train.resume import Preemption
from llava_train.train.run_folder import Claim, RunFolder
from llava_train.train.trainer import LlavaTrainer, stream_state_file
from llava_train.train.validate import check_fits, check_train

log = logging.getLogger(__name__)

FINAL = "final"


def run(cfg: TrainJobConfig, output_dir: str, callbacks=()) -> dict[str, Any]:
    """Train, save `<output_dir>/final`, evaluate; returns the metrics also written to metrics.json.

    `callbacks`: extra `TrainerCallback`s (e.g. a library user's own) added to the trainer."""
    check_train(cfg)
    check_fits(cfg)  # CUDA only: the `llava plan` total against the visible GPU memory
    init_distributed(cfg.deepspeed)  # before TrainingArguments (ZeRO-3 batch check, partitioned init)
    log_on_main_process_only()
    out = Path(output_dir)
    folder = RunFolder(out)
    claim = folder.claim(cfg)  # refuses another run's folder or a live run there (train/identity.py)
    try:
        return train(cfg, out, claim, callbacks)
    finally:
        folder.release()


def train(cfg: TrainJobConfig, out: Path, claim: Claim, callbacks=()) -> dict[str, Any]:
    identity = claim.identity
    if claim.moved_to:
        log.info(f"{out} held an earlier run: moved it to {claim.moved_to}")
    if claim.finished:
        log.info(f"run {identity.run_id} in {out} has already finished: nothing to do (trainer.resume=false starts "
                 "it anew, moving this one aside)")
        teardown()
        return json.loads((out / "metrics.json").read_text())
    log.info(f"run {identity.run_id} (fingerprint {identity.fingerprint}) in {out}")
    torch.manual_seed(cfg.seed)

    with main_process_first():
        checkpoint = resolve_checkpoint(cfg.model)
    log.info(f"base checkpoint: {checkpoint}")
    processor = load_processor(checkpoint, cfg.model.family)  # the family's training chat template, saved everywhere
    train_ds, eval_ds = build_datasets(cfg.data, cfg.model, processor,
                                       batch_size=cfg.trainer.per_device_train_batch_size, seed=cfg.seed)

    args = training_arguments(cfg, out)  # before the model: under ZeRO-3 it is built partitioned
    # under FSDP2 checkpointing is FSDP's own (fsdp_arguments), not the model's
    checkpointing = cfg.trainer.gradient_checkpointing and not cfg.fsdp.enabled
    model = build_model(cfg.model, cfg.peft, checkpoint, gradient_checkpointing=checkpointing,
                        zero_stage=cfg.deepspeed.stage, seed=cfg.seed,
                        checkpoint_every_n_layers=cfg.trainer.checkpoint_every_n_layers,
                        offload_checkpoints=cfg.trainer.activation_offloading)
    set_generation_stop(model.generation_config, processor.tokenizer, get_family(cfg.model.family))
    preemption = Preemption(cfg.trainer.preemption_signals)
    shards = ShardReport()
    trainer = build_trainer(cfg, model, train_ds, processor, out, args=args,
                            callbacks=[preemption, shards, *callbacks], eval_ds=eval_ds, identity=identity)
    tracking = attach_callbacks(trainer, cfg, eval_ds, processor.tokenizer, out)
    resume_from = claim.resume
    if resume_from:
        log.info(f"resuming from {resume_from}")
        if cfg.data.streaming:  # the stream's position, saved with each checkpoint (LlavaTrainer)
            trainer.stream_state = json.loads(stream_state_file(resume_from, rank()).read_text())
    start = time.time()
    train_output = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.time() - start
    losses = loss_history(trainer.state.log_history)  # the whole run's, resumed or not
    if preemption.preempted:
        log.info(f"preempted: checkpoint saved to {preemption.checkpoint}; resume with trainer.resume=auto")
        teardown()
        return {"preempted": True, "checkpoint": preemption.checkpoint, "loss_history": losses}

    gather_for_export(trainer)
    trainer.save_final(out / FINAL, processor)

    skipped = train_ds.skipped  # at start and at fetch (pixels that failed to decode), all workers
    log.info(f"train: {skipped.summary()}")
    results: dict[str, Any] = {
        "run_id": identity.run_id,
        "train_loss": losses[-1][1] if losses else None,
        "first_train_loss": losses[0][1] if losses else None,
        "loss_history": losses,
        "train_seconds": round(train_seconds, 1),
        "train_samples": len(train_ds) if hasattr(train_ds, "__len__") else None,  # None: streamed
        "skipped_train_samples": dict(skipped.counts),
        "skipped_train_ids": skipped.ids,  # the first few per kind
        "base_checkpoint": checkpoint,
        "train_samples_per_second": train_output.metrics.get("train_samples_per_second"),
        "world_size": args.world_size,
    }
    if shards.summary:
        results["zero3_shards_rank0"] = shards.summary
    if eval_ds is not None and cfg.eval.enabled:
        # every rank generates (ZeRO-3 gathers weights collectively); rank 0 writes
        results.update(evaluate(trainer.model, eval_ds, processor.tokenizer, cfg, out if is_main_process() else None))
    tracking.finish(results, trainer.state.global_step, rows=cfg.eval.table_rows)
    if is_main_process():
        write_json_atomic(out / "metrics.json", results)
    teardown()
    return results


def loss_history(log_history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, training loss) of every training log in HF's history (which a checkpoint carries across resumes)."""
    return [(h["step"], float(h["loss"])) for h in log_history if "loss" in h and "step" in h]


def build_datasets(cfg: DataConfig, model_cfg: ModelConfig, processor, *, batch_size: int = 1, seed: int = 0):
    encoder = Encoder.from_config(processor.tokenizer, get_family(model_cfg.family),
                                  ImageGeometry.from_processor(processor), cfg)
    if cfg.streaming:  # read as a stream, this rank's shards only (data/streaming.py)
        from llava_train.data.streaming import StreamingDataset

        train = StreamingDataset(as_sources(cfg.train_path, cfg)[0], cfg, encoder, processor.image_processor,
                                 rank=rank(), world_size=world_size(), batch_size=batch_size, seed=seed)
        log.info(f"train: streaming {cfg.train_path}")
        evals = ConversationDataset(cfg.eval_path, cfg, encoder, processor.image_processor) if cfg.eval_path else None
        return train, evals
    # lazy for every source: nothing tokenised or read at start on any rank (data/index.py); the eval set
    # is small and generation needs its conversations: indexed exactly
    train = LazyConversationDataset(cfg.train_path, cfg, encoder, processor.image_processor)
    log.info(f"train: {len(train)} samples from {cfg.train_path} ({train.skipped.summary()})")
    evals = None
    if cfg.eval_path:
        evals = ConversationDataset(cfg.eval_path, cfg, encoder, processor.image_processor)
        log.info(f"eval: {len(evals)} samples from {cfg.eval_path} ({evals.skipped.summary()})")
    return train, evals


def build_model(model_cfg: ModelConfig, peft_cfg: PeftConfig, checkpoint: str, *,
                gradient_checkpointing: bool = False, zero_stage: int = 0, seed=None,
                checkpoint_every_n_layers: int = 1, offload_checkpoints: bool = False):
    quantization = quantization_config(peft_cfg, model_cfg, sharded=zero_stage == 3)
    model = load_model(model_cfg, checkpoint, quantization_config=quantization)
    if model_cfg.liger:
        log.info(f"liger: {apply_liger(model)} on the language model")
    if seed is not None:
        # adapter init from the seed alone: loading draws random numbers under ZeRO-3's partitioned init
        # (and when the tiny base is materialised) but not otherwise
        torch.manual_seed(seed)
    model = apply_peft(model, peft_cfg, model_cfg, gradient_checkpointing=gradient_checkpointing,
                       zero_stage=zero_stage, checkpoint_every_n_layers=checkpoint_every_n_layers,
                       offload_checkpoints=offload_checkpoints)
    if model_cfg.compile:  # after peft: the compiled blocks include their LoRA layers
        n = compile_language_layers(model, model_cfg.compile_backend)
        log.info(f"compile: {n} language-model blocks ({model_cfg.compile_backend})")
    log.info(f"method: {peft_cfg.method}, model.dtype: {model_cfg.dtype}")
    attention = getattr(model.config, "_attn_implementation", None) or model_cfg.attn_implementation
    log.info("%s", describe(model, attn_implementation=attention,
                             reentrant=checkpoint_reentrant(model_cfg, zero_stage)))
    return model


def training_arguments(cfg: TrainJobConfig, out: Path) -> TrainingArguments:
    """Every `trainer.*` TrainingArguments field as set (HF's defaults unless overridden), plus the fields the
    project fills from its own keys (`hf_args.OWNED`)."""
    t, o = cfg.trainer, cfg.optim
    kwargs = hf_arguments(t)
    workers = num_workers(cfg.data, cpu_compute=not torch.cuda.is_available())
    if cfg.eval.every_steps > 0 and t.eval_strategy == "no":  # eval.every_steps: a shorthand for HF's schedule
        kwargs.update(eval_strategy="steps", eval_steps=cfg.eval.every_steps)
    kwargs.update(
        output_dir=str(out),
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        lr_scheduler_type=str(o.scheduler),
        warmup_steps=o.warmup_ratio,
        max_grad_norm=o.max_grad_norm,
        activation_checkpointing=False,  # build_model switches it on (reentrant choice, input grads)
        dataloader_pin_memory=torch.cuda.is_available() if t.dataloader_pin_memory is None else t.dataloader_pin_memory,
        report_to=report_to(cfg.logger),
        run_name=run_name(cfg.logger, out),
        project=cfg.logger.project,
        remove_unused_columns=False,
        dataloader_num_workers=workers,  # auto by default (data/sampler.py)
        dataloader_persistent_workers=workers > 0,
        seed=cfg.seed,
        tf32=resolve_tf32(t.tf32),
        bf16=cfg.model.dtype == "bf16",
        fp16=cfg.model.dtype == "fp16",
        train_sampling_strategy=str(t.data_order),
        **distributed_arguments(cfg.deepspeed, cfg.fsdp, gradient_checkpointing=cfg.trainer.gradient_checkpointing),
        ignore_data_skip=cfg.data.streaming or t.ignore_data_skip,  # a stream resumes itself (its saved state)
    )
    return TrainingArguments(**kwargs)


def build_trainer(cfg: TrainJobConfig, model, train_ds, processor, out: Path, args=None, callbacks=(), eval_ds=None,
                  identity: Optional[RunIdentity] = None):
    """The trainer; with HF's eval schedule on (trainer.eval_strategy, or eval.every_steps), its eval set is
    the first eval.max_samples eval samples (eval loss by HF's loop, generation metrics by GenerationEval)."""
    args = args if args is not None else training_arguments(cfg, out)
    collator, sampler = batching(cfg.data, train_ds, processor.tokenizer.pad_token_id,
                                 batch_size=args.per_device_train_batch_size, world_size=args.world_size,
                                 seed=cfg.seed)
    trainer = LlavaTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=in_training_eval_set(cfg.eval, eval_ds) if args.eval_strategy != "no" else None,
        data_collator=collator,
        callbacks=list(callbacks),
        optim_cfg=cfg.optim,
        train_batch_sampler=sampler,
        prefetch_factor=cfg.data.prefetch_factor,
        identity=identity,
        worker_ignored_signals=cfg.trainer.preemption_signals,
        processing_class=processor,  # saved into every checkpoint-N/ and final/ with the training template
        loss_chunk_tokens=cfg.model.loss_chunk_tokens,
        liger_loss=cfg.model.liger,
        offload_activations=cfg.trainer.activation_offloading and not cfg.trainer.gradient_checkpointing,
        mask_free_attention=cfg.model.mask_free_attention,
        deepspeed_cfg=cfg.deepspeed,
    )
    return trainer


def evaluate(model, eval_ds, tokenizer, cfg: TrainJobConfig, out: Optional[Path]) -> dict[str, Any]:
    preds = generate_predictions(model, eval_ds, tokenizer, batch_size=cfg.eval.batch_size,
                                 max_new_tokens=cfg.eval.max_new_tokens)
    m = metrics(preds)
    if out is not None:
        with open(out / "predictions.jsonl", "w") as f:
            for p in preds:
                f.write(json.dumps({"id": p.id, "question": p.question, "reference": p.reference,
                                    "prediction": p.prediction}) + "\n")
    log.info(f"eval accuracy (exact match): {m['exact_match']:.1%} on {m['count']} samples")
    for p in preds[: cfg.eval.show_samples]:
        mark = "ok " if p.exact else "BAD"
        log.info(f"  [{mark}] {p.question!r} -> {p.prediction!r} (reference {p.reference!r})")
    return {"eval_accuracy": m["exact_match"], "eval_contains_accuracy": m["contains_match"],
            "eval_count": m["count"]}
