"""HF Trainer, customised only through its public hooks, plus the callbacks a run uses."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback

from llava_train.model.adapter_files import save_unsaved_trainables
from llava_train.model.param_groups import param_groups
from llava_train.train.distributed import VisionKeepAlive
from llava_train.train.loss import sparse_inputs, trained_token_loss


class LlavaTrainer(Trainer):
    """HF Trainer, customised only through public hooks: per-module learning rates
    (`create_optimizer`) and a loss that projects only trained positions onto the vocabulary
    (`compute_loss_func`, normalised over the accumulated batch by `num_items_in_batch`, with
    `compute_loss` adding the trained-position mask to the inputs; HF scales it across ranks)."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, optim_cfg, train_batch_sampler=None, prefetch_factor=None, **kwargs):
        super().__init__(*args, compute_loss_func=trained_token_loss, **kwargs)
        self.optim_cfg = optim_cfg
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
        inputs = sparse_inputs(inputs)
        if self.vision_keepalive is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with self.vision_keepalive.batch(inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            kwargs.pop("lr", None)
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
