"""Up-front validation: every incompatible setting collected into one error before any weights load."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import SchedulerType

from llava_train.config import DataConfig, TrainJobConfig
from llava_train.config.hf_args import choice_problem, value_problems
from llava_train.data.dataset import check_data
from llava_train.data.sampler import batching_problems
from llava_train.model.adapt import checkpoint_reentrant
from llava_train.model.load import checkpoint_config, meta_model, resolve_checkpoint
from llava_train.model.quantize import skip_problems
from llava_train.model.speed import liger_text_problems, speed_problems
from llava_train.model.targets import target_problems
from llava_train.ranks import world_size
from llava_train.resources import DEMO_DATA
from llava_train.train.distributed import check_deepspeed, check_fsdp
from llava_train.train.resume import check_resume_settings


class ConfigError(ValueError):
    """All problems with a job configuration at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def check_train(cfg: TrainJobConfig) -> None:
    """Raise `ConfigError` listing every problem found in `cfg` (no weights, no data decoding)."""
    problems: list[str] = value_problems(cfg.trainer)  # closed choices are enums: Hydra refused bad ones
    problems += check_data(cfg.data) + demo_eval_problems(cfg.data)
    if cfg.data.train_path and cfg.data.sources:
        problems.append(f"both data.train_path={cfg.data.train_path} and data.sources are set: data.sources replaces "
                        "data.train_path, so clear one of them (data.train_path= or data.sources=[])")
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
    problems += bad_value_problems(cfg)
    if cfg.optim.lr <= 0:
        problems.append("optim.lr must be > 0")
    problems += choice_problem("optim.scheduler", cfg.optim.scheduler, SchedulerType)
    if cfg.trainer.eval_strategy != "no" and not cfg.data.eval_path:
        problems.append(f"trainer.eval_strategy={cfg.trainer.eval_strategy} evaluates during training but there is no "
                        "eval split: set data.eval_path (or trainer.eval_strategy=no)")
    problems += model_problems(cfg)
    problems += check_deepspeed(cfg.deepspeed, cfg.peft) + check_resume_settings(cfg.trainer)
    problems += check_fsdp(cfg.fsdp, cfg.deepspeed, cfg.peft)
    if problems:
        raise ConfigError(problems)


def check_fits(cfg: TrainJobConfig) -> None:
    """On a CUDA machine, refuse a run whose memory plan (`llava plan`) exceeds the visible GPU memory."""
    from llava_train.train.plan import fit_problems

    problems = fit_problems(cfg)
    if problems:
        raise ConfigError(problems)


def bad_value_problems(cfg: TrainJobConfig) -> list[str]:
    """Values HF would silently reinterpret (max_steps=0 trains one step, a warm-up ratio of 1 is one step)
    or that fail only after training (the eval batch size)."""
    t, problems = cfg.trainer, []
    if t.max_steps == 0 or t.max_steps < -1:
        problems.append(f"trainer.max_steps={t.max_steps}: use a positive number of optimizer steps, or -1 to train "
                        "trainer.num_train_epochs epochs")
    if not 0 <= cfg.optim.warmup_ratio < 1:
        problems.append(f"optim.warmup_ratio={cfg.optim.warmup_ratio}: the fraction of training spent warming up "
                        "must be in [0, 1)")
    if t.per_device_eval_batch_size < 1:
        problems.append(f"trainer.per_device_eval_batch_size={t.per_device_eval_batch_size} must be >= 1")
    if cfg.eval.batch_size < 1:
        problems.append(f"eval.batch_size={cfg.eval.batch_size} must be >= 1")
    problems += model_path_problems(cfg.model.path, "model.path")
    return problems


def looks_local(path: str) -> bool:
    """A path rather than a hub id (`org/name`): absolute, ~, ./ or ../, a trailing slash, or more than one /."""
    return (path.startswith(("/", "~", "./", "../", ".\\")) or path in (".", "..") or path.endswith("/")
            or path.count("/") > 1)


def model_path_problems(path: str, key: str) -> list[str]:
    """A local-looking path that does not exist is refused here, not sent to the hub (a long network timeout)."""
    if path and path != "tiny" and looks_local(path) and not Path(path).expanduser().exists():
        return [f"{key}={path!r}: no such folder; a hub id looks like org/name"]
    return []


def model_problems(cfg: TrainJobConfig) -> list[str]:
    """Model, method, precision, checkpointing and batch settings; LoRA targets and quantisation skips
    are checked against the checkpoint's module tree built on the meta device (config.json only)."""
    m, p, ds, t = cfg.model, cfg.peft, cfg.deepspeed, cfg.trainer
    problems: list[str] = []
    for name in ("projector_lr", "vision_lr"):
        value = getattr(cfg.optim, name)
        if value is not None and value <= 0:
            problems.append(f"optim.{name} must be > 0 (or null: same as optim.lr)")
    if m.attn_implementation == "flash_attention_2":
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
    if not model_path_problems(m.path, "model.path"):  # a missing folder is reported once (value_problems)
        problems += _checkpoint_problems(cfg)
    return problems


def _qlora_problems(cfg: TrainJobConfig) -> list[str]:
    p, ds = cfg.peft, cfg.deepspeed
    problems = []
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append("peft.method=qlora needs bitsandbytes (pip install bitsandbytes)")
    if p.bits not in (4, 8):
        problems.append(f"peft.bits={p.bits}: use 4 or 8")
    if p.bits == 8 and ds.stage == 3:
        # bitsandbytes 0.50 Linear8bitLt.forward: `self.weight.data = self.state.CB` after every forward
        problems.append("peft.bits=8 (LLM.int8) with deepspeed.stage=3 is refused: bitsandbytes' Linear8bitLt keeps "
                        "the whole int8 weight in its matmul state (state.CB) and writes it back into the parameter "
                        "after every forward, so ZeRO-3 cannot shard it (every rank holds the full 8-bit model). "
                        "Use 4-bit QLoRA (peft=qlora: its packed weights are sharded) or deepspeed=none")
    elif p.bits == 8 and ds.stage > 0:
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
    problems = image_length_problems(cfg.data, config)
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


def image_length_problems(data: DataConfig, config) -> list[str]:
    """data.max_length must hold at least one image of the checkpoint's largest size: shorter, every such
    sample is dropped (an image is never cut)."""
    from llava_train.model.catalog import geometry, largest_image_tokens

    geo = geometry(config)
    largest = largest_image_tokens(geo)
    if data.max_length >= largest:
        return []
    return [f"data.max_length={data.max_length} is smaller than one image of the checkpoint's largest size: "
            f"{largest} tokens (base {geo.image_size} px, patch {geo.patch_size}, grid pinpoints "
            f"{[list(p) for p in geo.grid_pinpoints]}); samples with such images would all be dropped. Set "
            f"data.max_length >= {largest} plus your text (the real-model configs use 4096)"]


def demo_eval_problems(data: DataConfig) -> list[str]:
    """The bundled demo eval set scores the demo task only: refuse it beside other training data."""
    demo = DEMO_DATA.resolve()

    def is_demo(path) -> bool:
        return bool(path) and demo in Path(path).resolve().parents

    if not data.eval_path or not is_demo(data.eval_path):
        return []
    train = [data.train_path] + [s.path for s in data.sources] if data.train_path else [s.path for s in data.sources]
    if train and all(is_demo(t) for t in train):
        return []
    return [f"data.eval_path={data.eval_path} is the bundled demo eval set (synthetic shapes) but the training "
            f"data ({', '.join(map(str, train)) or 'none'}) is not the demo: set data.eval_path to your own "
            "eval set, or data.eval_path=null"]
