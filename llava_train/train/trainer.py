"""HF Trainer, customised through its public hooks, and its checkpoint writing made atomic."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from llava_train.data.streaming import StreamingDataset, StreamingLoader
from llava_train.files import publish, remove_staging
from llava_train.model.adapter_files import save_unsaved_trainables
from llava_train.model.param_groups import param_groups
from llava_train.model.speed import OffloadActivations, without_padding_mask
from llava_train.ranks import rank
from llava_train.train.distributed import VisionKeepAlive, use_cpu_adam
from llava_train.train.identity import STAGING, RunIdentity
from llava_train.train.loss import sparse_inputs, sparse_lm_loss, trained_token_loss
from llava_train.train.resume import ignore_signals_in_worker, seal

SUPERSEDED = "superseded"  # where a published folder in the way of a new one is moved (never deleted)

log = logging.getLogger(__name__)


class LlavaTrainer(Trainer):
    """HF Trainer, customised only through public hooks: per-module learning rates
    (`create_optimizer`) and a loss that projects only trained positions onto the vocabulary
    (`compute_loss_func`, normalised over the accumulated batch by `num_items_in_batch`, with
    `compute_loss` adding the trained-position mask to the inputs; HF scales it across ranks). Checkpoints
    are written whole (staging folder, seal, rename: `_save_checkpoint`, the one private method overridden,
    with `_get_output_dir` that points HF's writing at the staging folder)."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, optim_cfg, train_batch_sampler=None, prefetch_factor=None,
                 identity: Optional[RunIdentity] = None, worker_ignored_signals=("SIGTERM", "SIGUSR1"),
                 loss_chunk_tokens: int = 0, liger_loss: bool = False, offload_activations: bool = False,
                 mask_free_attention: bool = False, deepspeed_cfg=None, **kwargs):
        super().__init__(*args, compute_loss_func=trained_token_loss, **kwargs)
        self.identity = identity  # sealed into every checkpoint
        self.worker_ignored_signals = [getattr(signal, s) for s in worker_ignored_signals]
        # Extra files written into each checkpoint before it is sealed: f(folder, state), rank 0.
        self.checkpoint_writers: list[Callable] = []
        self._staging: Optional[Path] = None
        self.optim_cfg = optim_cfg
        # model.loss_chunk_tokens / model.liger: how the trained positions are scored (train/loss.py)
        self.loss_options = {"chunk_tokens": loss_chunk_tokens, "liger": liger_loss}
        # trainer.activation_offloading without checkpointing: saved activations wait in CPU memory
        self.offload_activations = offload_activations
        self.mask_free_attention = mask_free_attention  # model.mask_free_attention (model/speed.py)
        self.deepspeed_cfg = deepspeed_cfg
        # several ranks: a text-only batch still runs the vision path (ZeRO-3 hang fix, see VisionKeepAlive)
        self.vision_keepalive = VisionKeepAlive(self.model) if self.args.world_size > 1 else None
        self.train_batch_sampler = train_batch_sampler  # a global batch plan (data/sampler.py) or None
        self.prefetch_factor = prefetch_factor

    stream_state = None  # a streaming loader's saved position, set before train() when resuming
    stream_loader = None

    def get_train_dataloader(self):
        """Streaming data (data.streaming): the `StreamingLoader` (this rank's shards, its own epochs and
        resume state; not re-sharded by accelerate). With a batch plan: its batches (grouped / token-budget /
        packed). The plan yields the global list of batches; accelerate's `BatchSamplerShard` (batch_size
        None: variable-sized batches) hands batch k to rank k % world_size, the plan's own split, and
        `skip_first_batches` resumes it."""
        workers = self.args.dataloader_num_workers
        if isinstance(self.train_dataset, StreamingDataset):
            self.stream_loader = StreamingLoader(self.train_dataset, self.data_collator, num_workers=workers,
                                                 prefetch_factor=self.prefetch_factor,
                                                 worker_init_fn=ignore_signals_in_worker(self.worker_ignored_signals))
            if self.stream_state is not None:
                self.stream_loader.load_state_dict(self.stream_state)
            return self.stream_loader
        if self.train_batch_sampler is None:
            return self._workers_ignore_signals(super().get_train_dataloader())
        loader = torch.utils.data.DataLoader(
            self.train_dataset,
            batch_sampler=self.train_batch_sampler,
            collate_fn=self.data_collator,
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )
        return self._workers_ignore_signals(self.accelerator.prepare(loader))

    def _workers_ignore_signals(self, loader):
        """Preemption signals sent to the whole process group must not kill the workers (the run would die
        with "DataLoader worker killed" instead of checkpointing): they ignore them (train/resume.py)."""
        base = getattr(loader, "base_dataloader", loader)  # accelerate's wrapper iterates the DataLoader inside
        base.worker_init_fn = ignore_signals_in_worker(self.worker_ignored_signals, base.worker_init_fn)
        return loader

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.mask_free_attention:
            inputs = without_padding_mask(inputs)
        with contextlib.ExitStack() as stack:
            if self.vision_keepalive is not None:
                stack.enter_context(self.vision_keepalive.batch(inputs))
            if self.offload_activations and model.training:
                stack.enter_context(OffloadActivations(model))
            if not (self.loss_options["chunk_tokens"] or self.loss_options["liger"]):
                return super().compute_loss(model, sparse_inputs(inputs), return_outputs, num_items_in_batch)
            # chunked / fused cross entropy applies the head itself (train/loss.py), so the loss is computed
            # here rather than by compute_loss_func, and HF's cross-rank scaling for a token-averaged loss
            # (Trainer.compute_loss, average_tokens_across_devices) is applied here too
            loss, outputs = sparse_lm_loss(model, inputs, num_items_in_batch, **self.loss_options)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes
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
            groups = param_groups(opt_model, self.optim_cfg)
            self.optimizer = cls(groups, **kwargs)
            names = ", ".join(f"{g['name']} (lr {g['lr']:g})" for g in groups)
            log.info(f"optimizer: {cls.__name__}, groups: {names}")
        return self.optimizer

    # --- atomic checkpoints: HF writes into a staging folder; rank 0 seals and renames it into place ------
    def _get_output_dir(self, trial):
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / STAGING

        def finish(folder: Path) -> None:  # rank 0, once every rank has written its part
            if self.identity is not None:
                self.identity.write(folder)
            for write in self.checkpoint_writers:
                write(folder, self.state)
            seal(folder, self.identity, self.state.global_step)

        with _Staged(staging / name, run_dir / name, self.args.should_save, finish) as folder:
            self._staging = staging
            try:
                super()._save_checkpoint(model, trial)  # its rotation sees the staging folder only
            finally:
                self._staging = None
            if self.stream_loader is not None:  # every rank's stream position, sealed with the checkpoint
                state = json.dumps(self.stream_loader.state_dict())
                stream_state_file(folder, rank()).write_text(state)
        if self.args.should_save:
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        _barrier()

    def save_final(self, folder: Path, processor=None) -> Path:
        """`save_model` (collective under ZeRO-3) into a staging folder that rank 0 renames to `folder`."""
        with _Staged(folder.parent / STAGING / folder.name, folder, self.args.should_save) as staging:
            self.save_model(str(staging))
            if self.args.should_save and processor is not None:
                processor.save_pretrained(str(staging))
        _barrier()
        return folder

    def save_model(self, output_dir=None, _internal_call=False):
        """Also for checkpoints: adds what peft's adapter file leaves out (image_newline) and, for an adapter,
        the generation config (its stop ids include the family's end-of-turn token)."""
        super().save_model(output_dir, _internal_call)
        save_unsaved_trainables(self.model, output_dir or self.args.output_dir, write=self.args.should_save)
        generation_config = getattr(self.accelerator.unwrap_model(self.model), "generation_config", None)
        if self.args.should_save and generation_config is not None:
            generation_config.save_pretrained(output_dir or self.args.output_dir)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def stream_state_file(folder, rank: int) -> Path:
    """Where each rank's streaming position (data/streaming.py) goes in a checkpoint."""
    return Path(folder) / f"stream_state_rank{rank}.json"


class _Staged:
    """Every rank writes into `staging` (cleared first by rank 0: a leftover of an interrupted save). On
    success, once all ranks are done, rank 0 runs `finish(staging)` (e.g. the seal), flushes it to disk and
    renames it to `target`; a folder already there is moved into `superseded/` first: a published folder is
    never rewritten in place, and nothing is deleted."""

    def __init__(self, staging: Path, target: Path, main: bool, finish: Optional[Callable] = None):
        self.staging, self.target, self.main, self.finish = staging, target, main, finish

    def __enter__(self) -> Path:
        if self.main:
            remove_staging(self.staging)
            self.staging.parent.mkdir(parents=True, exist_ok=True)
        _barrier()
        return self.staging

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            return False
        _barrier()  # every rank's files (DeepSpeed partitions, RNG states) are written
        if self.main:
            if self.finish is not None:
                self.finish(self.staging)
            publish(self.staging, self.target, aside=self.target.parent / SUPERSEDED)
            with contextlib.suppress(OSError):
                self.staging.parent.rmdir()  # the staging area, when nothing else is being written there
        return False
