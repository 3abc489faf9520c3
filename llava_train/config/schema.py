"""Typed configuration: one dataclass per config group, registered in Hydra's ConfigStore.

Defaults and documentation live here, once. YAML files under ``configs/`` only set values; Hydra
merges them onto these schemas, so a misspelt key or a wrong type fails at composition time.
Functions receive their slice (``DataConfig``, ``ModelConfig``...), never the whole job config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TinyModelConfig:
    """Geometry of the embedded default model (built from config, random weights, real tokenizer)."""

    seed: int = 0
    image_size: int = 28  # base image side; the real checkpoints use 336
    patch_size: int = 7  # real: 14
    vision_hidden_size: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden_size: int = 64
    text_intermediate_size: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2


@dataclass
class ModelConfig:
    """Which checkpoint to load and how."""

    # A hub id, a local folder, or "tiny" for the embedded default (materialised once into cache_dir).
    path: str = MISSING
    # Prompt family used to render conversations: mistral | vicuna | chatml | llama3 | qwen.
    family: str = "mistral"
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    # Where "tiny" is materialised. Empty: $LLAVA_TRAIN_CACHE or ~/.cache/llava-train.
    cache_dir: str = ""
    # Modules trained fully (and saved with an adapter). A randomly initialised base such as the tiny
    # model needs its embeddings and output head here; real checkpoints leave it empty.
    modules_to_save: list[str] = field(default_factory=list)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class DataConfig:
    """Training and evaluation data."""

    train_path: str = MISSING
    eval_path: Optional[str] = None
    # Folder that relative image paths resolve against. Empty: the data file's own folder.
    image_root: str = ""
    max_length: int = 2048
    # What to do with a sample whose first turn does not fit max_length: skip | error.
    overflow: str = "skip"
    # What to do with a bad sample (missing image, bad conversation...): error | skip.
    on_error: str = "error"
    num_workers: int = 0
    max_eval_samples: Optional[int] = None
    # Batches of similar total length (text + image tokens), cut from shuffled windows (data/sampler.py).
    group_by_length: bool = True
    # Text-only and image samples never share a batch (needs nothing but the index).
    group_by_modality: bool = True
    # Token budget: batches as large as fit this many padded tokens (batch size x longest); None: fixed
    # per_device_train_batch_size. Batches are then variable-sized and sorted by length.
    max_tokens_per_batch: Optional[int] = None
    # Several samples per row up to max_length (position ids restart per sample, attention stays inside
    # each sample; data/packing.py). per_device_train_batch_size then counts rows.
    packing: bool = False
    # Round the padded length up to a multiple of this (8 or 64 suits tensor cores; 1 on CPU).
    pad_to_multiple_of: int = 1
    # Batches each DataLoader worker prepares ahead (None: torch's default 2; only with num_workers > 0).
    prefetch_factor: Optional[int] = None
    # Batches per sorting window of the length grouping (larger: less padding, less random batches).
    group_window: int = 64
    # Lazy index for very large sets (data/index.py): no tokenisation or image reads at start; lengths
    # estimated from text size and an assumed image size; bad samples counted when fetched.
    lazy_index: bool = False
    # Image (height, width) the lazy index assumes for token estimates (COCO's typical 480x640).
    lazy_image_hw: list[int] = field(default_factory=lambda: [480, 640])
    # Save the lazy index next to the data file (<name>.lazyindex.npz, keyed by size and mtime) so other
    # ranks and restarts load it instead of scanning; skipped when the folder is not writable.
    lazy_index_cache: bool = True


@dataclass
class PeftConfig:
    """Fine-tuning method and its adapter settings."""

    method: str = "lora"  # lora | full
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # Regex over full module names (peft full-matches it). Default: the language model's linears only,
    # never the vision tower (whose leaf names q_proj/k_proj/... a leaf-name list would also hit).
    target_modules: str = (
        r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    )
    train_projector: bool = True
    train_vision_tower: bool = False


@dataclass
class OptimConfig:
    """Optimiser; per-module learning rates become separate parameter groups."""

    lr: float = 2e-4
    projector_lr: Optional[float] = None  # None: same as lr
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0


@dataclass
class TrainerConfig:
    """Loop settings handed to HF Trainer."""

    max_steps: int = -1
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    gradient_checkpointing: bool = False
    report_to: str = "none"
    disable_tqdm: bool = False


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO; stage 0 means plain (DDP or single process)."""

    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False


@dataclass
class EvalConfig:
    """Generation eval after training (greedy exact match on the eval split)."""

    enabled: bool = True
    max_new_tokens: int = 16
    batch_size: int = 16
    show_samples: int = 5


@dataclass
class TrainJobConfig:
    """`llava train`: everything one training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Where checkpoints, the final adapter and metrics.json go. Empty: Hydra's run folder.
    output_dir: str = ""
    seed: int = 42


def register_configs() -> None:
    """Register each subcommand's job schema in Hydra's ConfigStore (its YAML lists it first)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainJobConfig)
