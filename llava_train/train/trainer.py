"""HF Trainer, customised only through its public hooks, plus the callbacks a run uses."""

from __future__ import annotations

import contextlib

import torch
from transformers import Trainer, TrainerCallback

from llava_train.model.adapt import param_groups, save_unsaved_trainables
from llava_train.model.speed import OffloadActivations
from llava_train.train.distributed import VisionKeepAlive, use_cpu_adam
from llava_train.train.loss import sparse_lm_loss


class LlavaTrainer(Trainer):
    """HF Trainer, customised only through public hooks: per-module learning rates
    (`create_optimizer`) and a loss that projects only trained positions onto the vocabulary
    (`compute_loss`, already normalised over the accumulated batch: `loss_is_scaled_for_ga`)."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, optim_cfg, train_batch_sampler=None, prefetch_factor=None, loss_chunk_tokens: int = 0,
                 liger_loss: bool = False, offload_activations: bool = False, deepspeed_cfg=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.optim_cfg = optim_cfg
        # model.loss_chunk_tokens / model.liger: how the trained positions are scored (train/loss.py)
        self.loss_options = {"chunk_tokens": loss_chunk_tokens, "liger": liger_loss}
        # trainer.activation_offloading without checkpointing: saved activations wait in CPU memory
        self.offload_activations = offload_activations
        self.deepspeed_cfg = deepspeed_cfg
        # several ranks: a text-only batch still runs the vision path (ZeRO-3 hang fix, see VisionKeepAlive)
        self.vision_keepalive = VisionKeepAlive(self.model) if self.args.world_size > 1 else None
        self.train_batch_sampler = train_batch_sampler  # a global batch plan (data/sampler.py) or None
        self.prefetch_factor = prefetch_factor

    def get_train_dataloader(self):
        """With a batch plan: its batches (grouped / token-budget / packed). The plan yields the global
        list of batches; accelerate's `BatchSamplerShard` (batch_size None: variable-sized batches) hands
        batch k to rank k % world_size, the plan's own split, and `skip_first_batches` resumes it."""
        if self.train_batch_sampler is None:
            return super().get_train_dataloader()
        workers = self.args.dataloader_num_workers
        loader = torch.utils.data.DataLoader(
            self.train_dataset,
            batch_sampler=self.train_batch_sampler,
            collate_fn=self.data_collator,
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )
        return self.accelerator.prepare(loader)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with contextlib.ExitStack() as stack:
            if self.vision_keepalive is not None:
                stack.enter_context(self.vision_keepalive.batch(inputs))
            if self.offload_activations and model.training:
                stack.enter_context(OffloadActivations(model))
            loss, outputs = sparse_lm_loss(model, inputs, num_items_in_batch, **self.loss_options)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            kwargs.pop("lr", None)
            if self.deepspeed_cfg is not None and use_cpu_adam(self.deepspeed_cfg):
                # optimizer state offloaded by ZeRO: DeepSpeed's vectorised CPU AdamW steps it
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                cls = DeepSpeedCPUAdam
                kwargs = {"betas": (self.args.adam_beta1, self.args.adam_beta2), "eps": self.args.adam_epsilon,
                          "weight_decay": self.args.weight_decay, "adamw_mode": True}
            self.optimizer = cls(param_groups(opt_model, self.optim_cfg), **kwargs)
        return self.optimizer

    def save_model(self, output_dir=None, _internal_call=False):
        """Also for checkpoints: adds what peft's adapter file leaves out (image_newline)."""
        super().save_model(output_dir, _internal_call)
        save_unsaved_trainables(self.model, output_dir or self.args.output_dir, write=self.args.should_save)


class LossRecorder(TrainerCallback):
    def __init__(self):
        self.losses: list[tuple[int, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))
