"""Up-front validation: every incompatible setting collected into one error before any weights load."""

from __future__ import annotations

import importlib.util
import os

from llava_train.config import TrainJobConfig
from llava_train.data.dataset import check_data
from llava_train.data.sampler import batching_problems
from llava_train.data.templates import FAMILIES
from llava_train.model.adapt import checkpoint_reentrant, target_problems
from llava_train.model.load import DTYPES, checkpoint_config, meta_model, resolve_checkpoint
from llava_train.model.quantize import STORAGE_DTYPES, compute_dtype, skip_problems
from llava_train.model.speed import liger_text_problems, speed_problems
from llava_train.train.distributed import check_deepspeed
from llava_train.train.resume import check_resume_settings

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


class ConfigError(ValueError):
    """All problems with a job configuration at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_train(cfg: TrainJobConfig) -> None:
    """Raise `ConfigError` listing every problem found in `cfg` (no weights, no data decoding)."""
    problems: list[str] = []
    if cfg.model.family not in FAMILIES:
        problems.append(f"model.family={cfg.model.family!r} is not one of {sorted(FAMILIES)}")
    if cfg.model.dtype not in ("fp32", "bf16", "fp16"):
        problems.append(f"model.dtype={cfg.model.dtype!r}: use fp32, bf16 or fp16")
    if cfg.peft.method not in ("lora", "qlora", "full"):
        problems.append(f"peft.method={cfg.peft.method!r}: use lora, qlora or full")
    problems += check_data(cfg.data)
    problems += batching_problems(cfg.data)
    d = cfg.data
    if cfg.trainer.data_order == "sequential" and (d.group_by_length or d.group_by_modality or d.packing
                                                   or d.max_tokens_per_batch):
        problems.append("trainer.data_order=sequential keeps the file order, which the batch plans reorder: also set "
                        "data.group_by_length=false data.group_by_modality=false (and no packing/token budget)")
    if cfg.trainer.max_steps <= 0 and cfg.trainer.num_train_epochs <= 0:
        problems.append("set trainer.max_steps > 0 or trainer.num_train_epochs > 0")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(cfg.trainer, name) < 1:
            problems.append(f"trainer.{name} must be >= 1")
    if cfg.optim.lr <= 0:
        problems.append("optim.lr must be > 0")
    problems += model_problems(cfg)
    problems += check_deepspeed(cfg.deepspeed, cfg.peft) + check_resume_settings(cfg.trainer)
    if problems:
        raise ConfigError(problems)


def model_problems(cfg: TrainJobConfig) -> list[str]:
    """Model, method, precision, checkpointing and batch settings; LoRA targets and quantisation skips
    are checked against the checkpoint's module tree built on the meta device (config.json only)."""
    m, p, ds, t = cfg.model, cfg.peft, cfg.deepspeed, cfg.trainer
    problems: list[str] = []
    for name in ("projector_lr", "vision_lr"):
        value = getattr(cfg.optim, name)
        if value is not None and value <= 0:
            problems.append(f"optim.{name} must be > 0 (or null: same as optim.lr)")
    if m.attn_implementation not in ATTN_IMPLEMENTATIONS:
        problems.append(f"model.attn_implementation={m.attn_implementation!r}: use one of {list(ATTN_IMPLEMENTATIONS)}")
    elif m.attn_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if importlib.util.find_spec("flash_attn") is None:
            problems.append("model.attn_implementation=flash_attention_2 but the flash-attn package is not installed "
                            "(pip install flash-attn --no-build-isolation), or use sdpa")
        elif not is_flash_attn_2_available():
            problems.append("model.attn_implementation=flash_attention_2 needs flash-attn >= 2.3.3 and a CUDA GPU; "
                            "use sdpa")
        if m.dtype == "fp32":
            problems.append("model.attn_implementation=flash_attention_2 runs in fp16/bf16 only: set model.dtype=bf16")
    if p.method == "qlora":
        problems += _qlora_problems(cfg)
    # Reentrant checkpointing only backpropagates through a block whose inputs require grad.
    frozen_embeddings = p.method != "full" and not any("embed_tokens" in e for e in m.modules_to_save)
    if (t.gradient_checkpointing and checkpoint_reentrant(m, ds.stage) and frozen_embeddings
            and not m.input_require_grads):
        problems.append("trainer.gradient_checkpointing with reentrant checkpointing (model.checkpoint_reentrant, "
                        "or ZeRO-3) and frozen embeddings needs model.input_require_grads=true: otherwise no "
                        "gradient reaches the LoRA weights inside checkpointed layers")
    if t.global_batch_size is not None:
        per_step = world_size() * t.per_device_train_batch_size
        if t.global_batch_size != per_step * t.gradient_accumulation_steps:
            hint = (f"set trainer.gradient_accumulation_steps={t.global_batch_size // per_step}"
                    if per_step > 0 and t.global_batch_size % per_step == 0 and t.global_batch_size >= per_step
                    else f"it is not a multiple of world size x per-device batch = {per_step}")
            problems.append(f"trainer.global_batch_size={t.global_batch_size} != world size {world_size()} x "
                            f"per_device_train_batch_size {t.per_device_train_batch_size} x "
                            f"gradient_accumulation_steps {t.gradient_accumulation_steps}: {hint}")
    problems += speed_problems(m, t)
    problems += _checkpoint_problems(cfg)
    return problems


def _qlora_problems(cfg: TrainJobConfig) -> list[str]:
    m, p, ds = cfg.model, cfg.peft, cfg.deepspeed
    problems = []
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append("peft.method=qlora needs bitsandbytes (pip install bitsandbytes)")
    if p.bits not in (4, 8):
        problems.append(f"peft.bits={p.bits}: use 4 or 8")
    if p.quant_type not in ("nf4", "fp4"):
        problems.append(f"peft.quant_type={p.quant_type!r}: use nf4 or fp4")
    if compute_dtype(p, m) not in DTYPES:
        problems.append(f"peft.compute_dtype={p.compute_dtype!r}: use fp32, bf16 or fp16 (or empty: model.dtype)")
    if p.quant_storage not in STORAGE_DTYPES:
        problems.append(f"peft.quant_storage={p.quant_storage!r}: use one of {list(STORAGE_DTYPES)}")
    if p.bits == 8 and ds.stage > 0:
        problems.append(f"peft.bits=8 (LLM.int8) does not work with DeepSpeed (deepspeed.stage={ds.stage}): "
                        "use 4-bit QLoRA or deepspeed=none")
    return problems


def _checkpoint_problems(cfg: TrainJobConfig) -> list[str]:
    """Checks against the checkpoint's config.json and its module tree on the meta device (no weights)."""
    m, p = cfg.model, cfg.peft
    try:
        config = checkpoint_config(resolve_checkpoint(m))
    except Exception as e:  # hub id offline, missing folder, not a transformers checkpoint...
        return [f"model.path={m.path!r}: cannot read its config.json ({type(e).__name__}: {e})"]
    problems = []
    weights = str(getattr(config, "dtype", None) or "").removeprefix("torch.")
    if m.dtype == "fp16" and weights == "bfloat16":
        problems.append("model.dtype=fp16 but the checkpoint's weights are bf16: bf16 values overflow fp16's range "
                        "(inf/nan losses); use model.dtype=bf16 (or fp32)")
    problems += liger_text_problems(m, getattr(getattr(config, "text_config", None), "model_type", None))
    if p.method in ("lora", "qlora"):
        model = meta_model(config)
        problems += target_problems(model, p, m)
        if p.method == "qlora":
            problems += skip_problems(p, [n for n, _ in model.named_modules()])
    return problems
