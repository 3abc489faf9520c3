"""Running on several ranks: the DeepSpeed config, process-group setup/teardown,
and the ZeRO-3 fix for ranks whose batch has no image.

Launchers (launch/torchrun.sh, launch/deepspeed.sh, launch/slurm.sbatch, `accelerate launch --multi_gpu`)
set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; a SLURM job started by the submitit Hydra launcher
(one task per GPU) gets them from submitit's environment here.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from llava_train.config import DeepSpeedConfig, FsdpConfig, PeftConfig
from llava_train.constants import PIXEL_VALUES
from llava_train.ranks import is_main_process, rank, world_size

log = logging.getLogger(__name__)

AUTO = "auto"


def check_deepspeed(cfg: DeepSpeedConfig, peft: PeftConfig) -> list[str]:
    """Problems with the DeepSpeed settings (collected by validate.check_train, before any weights load)."""
    problems = []
    if cfg.stage not in (0, 2, 3):
        problems.append(f"deepspeed.stage={cfg.stage}: use 0 (off), 2 or 3")
    if cfg.offload_param and cfg.stage != 3:
        problems.append("deepspeed.offload_param needs deepspeed.stage=3")
    if cfg.offload_optimizer and cfg.stage == 0:
        problems.append("deepspeed.offload_optimizer needs deepspeed.stage=2 or 3")
    if cfg.cpu_adam and not cfg.offload_optimizer:
        problems.append("deepspeed.cpu_adam steps an offloaded optimizer state: also set "
                        "deepspeed.offload_optimizer=true")
    return problems


def deepspeed_config(cfg: DeepSpeedConfig) -> Optional[dict[str, Any]]:
    """The DeepSpeed JSON dict for `TrainingArguments(deepspeed=...)`, or None for stage 0.

    Batch sizes, accumulation, clipping, precision and bucket sizes are "auto": HF Trainer fills them
    from TrainingArguments and the model, so they can never disagree. No "optimizer"/"scheduler"
    sections: the Trainer's own optimizer (with its per-module learning-rate groups) and scheduler are
    handed to DeepSpeed."""
    if cfg.stage == 0:
        return None
    zero: dict[str, Any] = {
        "stage": cfg.stage,
        "overlap_comm": torch.cuda.is_available() if cfg.overlap_comm is None else cfg.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": AUTO,
    }
    if cfg.stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": AUTO,
            "stage3_param_persistence_threshold": AUTO if cfg.param_persistence_threshold is None
            else cfg.param_persistence_threshold,
            "stage3_gather_16bit_weights_on_model_save": cfg.gather_16bit_weights_on_model_save,
        })
    else:
        zero.update({"allgather_partitions": True, "reduce_scatter": True})
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": AUTO,
        "train_batch_size": AUTO,
        "gradient_accumulation_steps": AUTO,
        "gradient_clipping": AUTO,
        "bf16": {"enabled": AUTO},
        "fp16": {"enabled": AUTO},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # the Trainer logs; DeepSpeed's own step printing is noise
        "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer and not use_cpu_adam(cfg):
        # The Trainer's torch optimizer (per-module learning rates) steps on the offloaded fp32 state;
        # DeepSpeed otherwise insists on its own compiled CPU Adam.
        out["zero_force_ds_cpu_optimizer"] = False
    return out


def use_cpu_adam(cfg: DeepSpeedConfig) -> bool:
    """DeepSpeed's CPU Adam steps the offloaded optimizer state (LlavaTrainer.create_optimizer builds it over
    the same per-module parameter groups)."""
    return cfg.offload_optimizer and cfg.stage > 0 and cfg.cpu_adam is not False


FSDP_STATE_DICTS = ("SHARDED_STATE_DICT", "FULL_STATE_DICT")


def check_fsdp(cfg: FsdpConfig, ds: DeepSpeedConfig, peft: PeftConfig) -> list[str]:
    """Problems with the FSDP2 settings (collected by validate.check_train, before any weights load)."""
    if not cfg.enabled:
        return []
    problems = []
    if ds.stage > 0:
        problems.append(f"fsdp.enabled with deepspeed.stage={ds.stage}: both shard the model, choose one engine "
                        "(fsdp=full_shard deepspeed=none, or fsdp=none)")
    if peft.method == "qlora":
        problems.append(
            "peft.method=qlora with FSDP2 is refused: fully_shard turns each bitsandbytes Params4bit into a plain "
            "DTensor shard, and its parameter swap is reported to canonicalise the NaN bit patterns that packed "
            "4-bit codes stored in a float dtype happen to form, so the 4-bit matmul decodes wrong weights "
            "(https://github.com/bitsandbytes-foundation/bitsandbytes/issues/1945, open; FSDP2 QLoRA in "
            "accelerate: https://github.com/huggingface/accelerate/issues/3874, open). Shard QLoRA with "
            "deepspeed=zero3 (tested), or use peft=lora with FSDP2")
    if cfg.state_dict_type not in FSDP_STATE_DICTS:
        problems.append(f"fsdp.state_dict_type={cfg.state_dict_type!r}: use one of {list(FSDP_STATE_DICTS)}")
    if not torch.cuda.is_available():
        problems.append(
            "fsdp.enabled needs GPUs: accelerate turns FSDP on only for accelerator ranks (accelerate/state.py: "
            "MULTI_GPU/XPU/NPU/..., never MULTI_CPU), so CPU ranks would silently train as plain DDP. "
            "On CPU shard with deepspeed=zero3")
    return problems


def fsdp_arguments(cfg: FsdpConfig, *, gradient_checkpointing: bool) -> dict[str, Any]:
    """`TrainingArguments` keywords for FSDP2 (empty when off): wrapping per decoder / encoder layer (the
    model's `_no_split_modules`), FSDP's own activation checkpointing (HF's would all-gather twice in the
    backward, transformers#30404), mixed precision from TrainingArguments' bf16/fp16."""
    if not cfg.enabled:
        return {}
    return {"fsdp": True, "fsdp_config": {
        "version": 2,
        "reshard_after_forward": cfg.reshard_after_forward,
        "cpu_offload": cfg.cpu_offload,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": cfg.state_dict_type,
        "cpu_ram_efficient_loading": cfg.cpu_ram_efficient_loading,
        "activation_checkpointing": gradient_checkpointing,
    }}


def distributed_arguments(cfg: DeepSpeedConfig, fsdp: Optional[FsdpConfig] = None, *,
                          gradient_checkpointing: bool = False) -> dict[str, Any]:
    """`TrainingArguments` keywords for the launch: the DeepSpeed dict or FSDP2 settings, and CPU DDP (gloo)
    when several ranks run without GPUs (accelerate only picks its multi-CPU mode when told `cpu`; a single
    process is left alone)."""
    cpu_ranks = world_size() > 1 and not torch.cuda.is_available()
    out = {"deepspeed": deepspeed_config(cfg), "use_cpu": cpu_ranks}
    if fsdp is not None:
        out.update(fsdp_arguments(fsdp, gradient_checkpointing=gradient_checkpointing))
    return out


def gather_for_export(trainer) -> None:
    """Before the final save under FSDP: gather full tensors so the exported adapter is one ordinary file
    that loads anywhere (checkpoints stay sharded); PEFT's FSDP recipe does the same."""
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")


def _export_submitit_env() -> None:
    """Under the submitit SLURM launcher (one task per GPU, no torchrun: SLURM_NTASKS > 1 but no RANK)
    derive the torch.distributed variables from SLURM's, with submitit's own helper."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_distributed(cfg: DeepSpeedConfig) -> bool:
    """Initialise the process group when launched on several ranks; returns whether it did.

    Must run before `TrainingArguments` is built: with ZeRO-3 the Trainer's batch arithmetic check and
    partitioned model init need the group (measured on CPU: without it the check fails). A single process
    is left alone (no forced gloo backend)."""
    _export_submitit_env()
    if world_size() < 2 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if cfg.stage > 0:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
        if not torch.cuda.is_available():  # at exit, however the run ends (an exception included)
            atexit.register(release_deepspeed_shm, dist.get_rank())
    else:
        dist.init_process_group(backend=backend)
    return True


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    """Destroy the process group (a 2-rank run that finished sometimes hung at exit without this)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


SHM = Path("/dev/shm")


def release_deepspeed_shm(rank: int) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer from /dev/shm, if there is one.

    DeepSpeed's CPU collectives (`csrc/cpu/comm/shm.cpp::shm_initialize`, all ranks on one node) create a
    69 MB shared-memory file per rank, `deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`,
    and never unlink it ("the SHM object will remain in /dev/shm after DeepSpeed exit",
    deepspeedai/DeepSpeed#4115; still so in 0.19.8): every 2-rank CPU run left 138 MB of RAM-backed tmpfs
    behind (17 GB on this project's test machine, which then ran a benchmark out of memory). Run at exit:
    the name can go, every other rank keeps its mapping until it exits. Goes when DeepSpeed unlinks its
    buffers itself."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_" \
           f"{os.environ.get('MASTER_PORT', '')}_{rank}"
    with contextlib.suppress(FileNotFoundError):
        (SHM / name).unlink()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. materialising a cache), the others after it."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


class VisionKeepAlive:
    """ZeRO-3 fix for batches without images (the classic hang).

    Under ZeRO-3 every module's weights are all-gathered when it runs, collectively and in the same order
    on every rank. A rank whose batch is text-only never runs the vision tower and projector, so the
    ranks that do wait forever for it. This runs them on one dummy base-size image at the place the real
    forward does (right after the input embedding, via a forward hook on the embedding) and adds
    0 * sum(features): same parameters gathered in the same order on every rank, zero effect on the loss
    and on the gradients. It also keeps DDP's gradient buckets identical across ranks.
    Upstream: deepspeedai/DeepSpeed#7170 (open: ZeRO-3 hangs on mixed-modality batches); can go if DeepSpeed
    fixes it there or LlavaNext runs its vision path for text-only batches.
    """

    def __init__(self, model: torch.nn.Module):
        from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

        inner = [m for m in model.modules() if isinstance(m, LlavaNextModel)]
        if len(inner) != 1:
            raise ValueError(f"expected one LlavaNextModel inside {type(model).__name__}, found {len(inner)}")
        self.llava = inner[0]
        cfg = self.llava.config
        self.side = cfg.vision_config.image_size
        self.patches = image_size_to_num_patches((self.side, self.side), cfg.image_grid_pinpoints, self.side)
        self.active = False
        self.handle = None

    @contextlib.contextmanager
    def batch(self, inputs: dict) -> Iterator[None]:
        """Within this block, the forward of a batch without pixel values also runs the vision path."""
        if self.handle is None:
            # Registered at the first batch, i.e. after DeepSpeed has added its own hooks: its post-forward
            # hook must wrap the embedding output before ours adds the vision term, so that in backward the
            # projector is reached before the embedding, as on ranks with images (DeepSpeed checks that all
            # ranks record the same module order and stops with "Detected a disagreement" otherwise).
            self.handle = self.llava.get_input_embeddings().register_forward_hook(self._hook)
        self.active = PIXEL_VALUES not in inputs
        try:
            yield
        finally:
            self.active = False

    def _hook(self, module, args, output):
        if not self.active:
            return output
        self.active = False  # once per forward
        side = self.side
        dtype = self.llava.vision_tower.dtype
        pixels = torch.zeros((1, self.patches, 3, side, side), dtype=dtype, device=output.device)
        sizes = torch.tensor([[side, side]], device=output.device)
        feats = self.llava.get_image_features(pixels, sizes, return_dict=True).pooler_output
        return output + 0.0 * sum(f.sum() for f in feats).to(output.dtype)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def shard_summary(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """What this rank holds of the weights ZeRO-3 partitioned, split into bitsandbytes 4-bit weights and the
    rest: {"4bit"|"other": {tensors, sharded, bytes, local_bytes}} (+ "quant_state_bytes" for 4-bit, held
    whole on every rank). Persistent parameters (below deepspeed.param_persistence_threshold) stay whole.
    Empty when nothing is partitioned (not ZeRO-3)."""
    from llava_train.model.quantize import quantized_bytes

    out: dict[str, dict[str, int]] = {}
    seen_state: set[int] = set()  # code tables can be shared between weights: count each tensor once
    for p in model.parameters():
        if not hasattr(p, "ds_id"):
            continue
        packed, state = quantized_bytes(p)
        row = out.setdefault("4bit" if packed else "other",
                             {"tensors": 0, "sharded": 0, "bytes": 0, "local_bytes": 0, "quant_state_bytes": 0})
        for t in state:
            if t.data_ptr() not in seen_state:
                seen_state.add(t.data_ptr())
                row["quant_state_bytes"] += t.numel() * t.element_size()
        full = p.ds_numel * p.ds_tensor.element_size()
        row["tensors"] += 1
        row["bytes"] += full
        if p.ds_persist:
            row["local_bytes"] += full
        else:
            row["sharded"] += 1
            row["local_bytes"] += p.ds_tensor.numel() * p.ds_tensor.element_size()
    return out


def describe_shards(summary: dict[str, dict[str, int]]) -> str:
    lines = [f"ZeRO-3 partitioned weights, rank {rank()} of {world_size()}:"]
    for kind, r in summary.items():
        line = (f"  {kind + ' weights':<14} {r['sharded']}/{r['tensors']} tensors sharded, "
                f"{r['local_bytes']:,} of {r['bytes']:,} bytes on this rank")
        if r["quant_state_bytes"]:
            line += f" (+ {r['quant_state_bytes']:,} bytes of quantisation state, whole on every rank)"
        lines.append(line)
    return "\n".join(lines)


class ShardReport(TrainerCallback):
    """At the start of training (after DeepSpeed partitioned the model) print what rank 0 holds, and keep it
    for metrics.json: the check that 4-bit QLoRA weights are really sharded under ZeRO-3."""

    def __init__(self):
        self.summary: dict[str, dict[str, int]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.summary = shard_summary(model) if model is not None else {}
        if self.summary and is_main_process():
            log.info("%s", describe_shards(self.summary))
