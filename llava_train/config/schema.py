"""Typed configuration: one dataclass per config group, and `llava train`'s job (the other subcommands' jobs
are in jobs.py, closed choices in choices.py, `trainer.*`'s TrainingArguments fields in hf_args.py).

Defaults and documentation live here, once. YAML files under ``configs/`` only set values; Hydra
merges them onto these schemas, so a misspelt key or a wrong type fails at composition time.
Functions receive their slice (``DataConfig``, ``ModelConfig``...), never the whole job config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from llava_train.config.choices import (
    Attention,
    DataFormat,
    DataOrder,
    DType,
    Family,
    ImagePlacement,
    ImageSizes,
    Method,
    OnError,
    Overflow,
    QuantStorage,
    QuantType,
    SpecialTokensInText,
    Tracker,
    WandbMode,
)
from llava_train.config.hf_args import with_training_arguments
from llava_train.config.plan import PlanConfig


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
    family: Family = Family.mistral
    dtype: DType = DType.fp32
    attn_implementation: Attention = Attention.sdpa  # sdpa | eager | flash_attention_2 | auto
    # (auto: flash_attention_2 when flash-attn is importable on a CUDA machine, else sdpa; decided at load)
    # Where "tiny" is materialised. Empty: $LLAVA_TRAIN_CACHE or ~/.cache/llava-train.
    cache_dir: str = ""
    # Modules trained fully (and saved with an adapter). A randomly initialised base such as the tiny
    # model needs its embeddings and output head here; real checkpoints leave it empty.
    modules_to_save: list[str] = field(default_factory=list)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    # Gradient checkpointing (switched on by trainer.gradient_checkpointing) uses non-reentrant
    # torch.utils.checkpoint; under ZeRO-3 reentrant, because non-reentrant recomputation meets frozen
    # parameters already re-partitioned (huggingface/transformers#47254, fixed by deepspeedai/DeepSpeed#8148).
    # null: that choice; true/false: forced.
    checkpoint_reentrant: Optional[bool] = None
    # Make the embeddings' output require grad, so reentrant-checkpointed blocks with frozen inputs
    # still backpropagate into LoRA weights ("none of the inputs have requires_grad").
    input_require_grads: bool = True
    # torch.compile each decoder block of the language model (regional compile: one graph per block
    # class, reused by every layer; compiles in seconds, not minutes, and leaves the vision tower eager).
    compile: bool = False
    # torch.compile backend: inductor (fused kernels; needs a C compiler on CPU, Triton on GPU) |
    # aot_eager (traces and runs eagerly: checks a model compiles, no speed-up) | eager.
    compile_backend: str = "inductor"
    # Liger-Kernel's Triton kernels (RMSNorm, RoPE, SwiGLU) on the language model, and its fused linear
    # cross entropy on the trained positions. CUDA + the liger-kernel package; mistral/llama/qwen2 text models.
    liger: bool = False
    # Chunked linear cross entropy (CPU/GPU, pure torch): project the trained positions onto the vocabulary
    # this many at a time, each chunk's logits recomputed in backward, so at most one [chunk, vocab] block
    # of logits exists at once. 0: all trained positions in one matmul (the sparse head alone).
    loss_chunk_tokens: int = 0
    # Right-padded batches train without their padding mask (causal attention hides the padding; same loss and
    # gradients) so attention runs is_causal, skipping the masked half (model/speed.py). false: mask passed.
    mask_free_attention: bool = True


@dataclass
class DataSourceConfig:
    """One entry of `data.sources` (several sources mixed with weights)."""

    # A .json/.jsonl/.parquet/.arrow/.csv file, a `save_to_disk` folder, or a hub dataset id.
    path: str = MISSING
    # Epoch multiplier: 2.0 repeats the source twice per epoch, 0.5 keeps a seeded half of it.
    weight: float = 1.0
    # auto | llava | messages. Empty: data.format.
    format: str = ""
    # Folder relative image paths of this source resolve against. Empty: data.image_root.
    image_root: str = ""
    split: str = "train"  # split of a saved DatasetDict or a hub dataset
    name: Optional[str] = None  # hub dataset configuration name


@dataclass
class DataConfig:
    """Training and evaluation data."""

    # A .json/.jsonl/.parquet/.arrow/.csv file, a `save_to_disk` folder or a hub id; may stay empty
    # when `sources` is set.
    train_path: str = ""
    eval_path: Optional[str] = None
    # Folder that relative image paths resolve against. Empty: the data file's own folder.
    image_root: str = ""
    max_length: int = 2048
    # A sample longer than max_length: drop_turns (drop whole trailing turns; skip, counted, when even
    # the first turn does not fit) | skip (skip it whole, counted) | error (raise, naming it).
    overflow: Overflow = Overflow.drop_turns
    # What to do with a bad sample (missing image, bad conversation...): error | skip.
    on_error: OnError = OnError.error
    # DataLoader worker processes per rank, which read, tokenise and decode samples ahead of the step
    # (persistent across epochs). None: auto = min(4, CPU cores per rank - the training process's cores):
    # it keeps 1 on a GPU, torch's threads (every core) when training on the CPU, so 0 there and on a
    # machine with a core per rank (workers would only compete with the training process); set 0 to fetch
    # in-process.
    num_workers: Optional[int] = None
    # Input format: auto (detected per row) | llava (conversations/from/value) | messages (role/content).
    format: DataFormat = DataFormat.auto
    # Train only the last assistant reply of each sample (earlier replies become context, label -100).
    train_last_turn_only: bool = False
    # Message text spelling a special token: text (plain text, so data cannot end a sequence or forge a
    # turn boundary) | parse (the control token it spells). `llava doctor` counts such samples.
    special_tokens_in_text: SpecialTokensInText = SpecialTokensInText.text
    # A turn's single <image>: front (moved to the front of the turn, as LLaVA's preprocessing and every
    # inference path do) | as_written. Turns with several images keep them where they are.
    image_placement: ImagePlacement = ImagePlacement.front
    # Several training sources mixed with weights; when set, they replace train_path.
    sources: list[DataSourceConfig] = field(default_factory=list)
    # Seed of the subsampling that fractional source weights do.
    mix_seed: int = 0
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
    # Round the padded length up to a multiple of this (8 or 64 suits tensor cores). None: 8 on a CUDA
    # GPU, 1 on CPU.
    pad_to_multiple_of: Optional[int] = None
    # Threads fetching a batch's samples together (decoding and resizing release the GIL). None: auto = torch's
    # threads in the training process (num_workers=0: those cores wait for the batch), 1 in a DataLoader worker.
    fetch_threads: Optional[int] = None
    # Batches each DataLoader worker prepares ahead (None: torch's default 2; only with num_workers > 0).
    prefetch_factor: Optional[int] = None
    # Batches per sorting window of the length grouping (larger: less padding, less random batches).
    group_window: int = 64
    # Training data is always lazy (data/index.py): no tokenisation or pixel decoding at start; lengths
    # estimated from text size and image sizes; bad samples counted (and replaced) when fetched.
    # Image sizes of the length estimates (one image is 1,900-2,928 tokens at 336 px by its shape: grouped
    # batches are 98 % real tokens with `headers`, 90 % with `assumed`; see ImageSizes).
    image_sizes: ImageSizes = ImageSizes.headers
    # Pixel values by llava-train's own path (data/pixels.py): bit-identical to the PIL LLaVA-NeXT processor, used
    # only where exact (e.g. not the torchvision backend), ~2x faster. false: always the processor itself.
    fast_pixels: bool = True
    # Image (height, width) the length estimates assume where no header is read (COCO's typical 480x640).
    lazy_image_hw: list[int] = field(default_factory=lambda: [480, 640])
    # Save the lazy index (and header sizes) next to the data file (<name>.lazyindex.npz,
    # <name>.imagesizes.npz, keyed by size and mtime) so other ranks and restarts load them instead of
    # scanning; skipped when the folder is not writable.
    lazy_index_cache: bool = True
    # Stream the training source instead of indexing it (data/streaming.py): HF streaming sources and
    # WebDataset tar shards (`/d/shards-*.tar`, or any fsspec URL); sharded over ranks and workers, length
    # grouping inside group_window batches; needs trainer.max_steps.
    streaming: bool = False
    # Examples in datasets' shuffle buffer when streaming (0: no shuffling beyond the shard order).
    stream_shuffle_buffer: int = 1000


@dataclass
class PeftConfig:
    """Fine-tuning method and its adapter settings."""

    method: Method = Method.lora  # lora | qlora (LoRA on a bitsandbytes-quantised base) | full
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # Regex over full module names (peft full-matches it). Default: the language model's linears only,
    # never the vision tower (whose leaf names q_proj/k_proj/... a leaf-name list would also hit).
    target_modules: str = (
        r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    )
    train_projector: bool = True
    # full: train the vision tower too; lora/qlora: add LoRA on the vision tower's linears
    # (vision_target_modules). Without it, a target regex that touches the vision tower is refused.
    train_vision_tower: bool = False
    use_rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r
    use_dora: bool = False  # weight-decomposed LoRA (DoRA)
    # More LoRA targets: a regex over full module names, OR'ed with target_modules. Empty: none.
    extra_target_modules: str = ""
    # LoRA targets in the vision tower, used when train_vision_tower is on (lora/qlora).
    vision_target_modules: str = (
        r"model\.vision_tower\.(vision_model\.)?encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))"
    )
    # The learned row separator of LLaVA-NeXT's anyres features (a bare parameter, saved with the adapter).
    train_image_newline: bool = True
    # qlora: 4 (nf4/fp4 QLoRA) or 8 (LLM.int8; not with DeepSpeed).
    bits: int = 4
    quant_type: QuantType = QuantType.nf4  # nf4 | fp4 (4-bit only)
    double_quant: bool = True  # quantise the quantisation constants too (4-bit only)
    compute_dtype: Optional[DType] = None  # fp32 | bf16 | fp16; null: model.dtype
    # Storage dtype of packed 4-bit weights. auto: model.dtype under ZeRO-3 / FSDP2, so they are partitioned
    # like every other tensor; uint8 otherwise.
    quant_storage: QuantStorage = QuantStorage.auto
    # Kept in full precision, by FULL module-name prefix (transformers 5 does not match short names,
    # huggingface/transformers#42455:
    # "vision_tower" would leave the CLIP tower quantised).
    quant_skip_modules: list[str] = field(
        default_factory=lambda: ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
    )


@dataclass
class OptimConfig:
    """Optimiser; per-module learning rates become separate parameter groups."""

    lr: float = 2e-4
    projector_lr: Optional[float] = None  # None: same as lr (also image_newline's)
    vision_lr: Optional[float] = None  # vision tower (full or LoRA); None: same as lr
    # No weight decay for 1-D parameters and for names containing any of these.
    no_decay: list[str] = field(default_factory=lambda: ["bias", "norm", "image_newline"])
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0


@with_training_arguments
@dataclass
class TrainerConfig:
    """Loop settings handed to HF Trainer: every `TrainingArguments` field is a key here (HF's type, default
    and docs; e.g. trainer.optim=adamw_bnb_8bit trainer.tf32=true trainer.eval_strategy=steps), added by
    `with_training_arguments` (config/hf_args.py). Declared below: the keys with a default or meaning of
    the project's own. HF fields set from other keys (learning rate, precision...) are in hf_args.OWNED."""

    num_train_epochs: float = 1.0
    per_device_eval_batch_size: int = 16
    logging_steps: int = 10
    save_total_limit: Optional[int] = 2
    # Gradient (activation) checkpointing, switched on by build_model (reentrant choice, input grads).
    gradient_checkpointing: bool = False
    # Selective checkpointing: with gradient_checkpointing, checkpoint only every k-th decoder layer of the
    # language model (1: all); the others keep their activations (less recomputation, more memory).
    checkpoint_every_n_layers: int = 1
    # Activations kept in (pinned) CPU memory between forward and backward. With gradient_checkpointing:
    # the checkpointed layers' inputs (transformers' offload); without: every activation except weights.
    activation_offloading: bool = False
    # TF32 matmuls on Ampere or newer GPUs. None: on where supported (off on CPU and older GPUs).
    tf32: Optional[bool] = None
    disable_tqdm: bool = False
    # Pinned host memory for batches. None: on when a GPU is present.
    dataloader_pin_memory: Optional[bool] = None
    # When set, must equal world size x per_device_train_batch_size x gradient_accumulation_steps.
    global_batch_size: Optional[int] = None
    # Continue from a checkpoint: "auto" (the newest complete checkpoint in output_dir, else start fresh),
    # a checkpoint folder, or "false". Only complete checkpoints (their seal matches their files) of the
    # same run are picked; what a start in a used output_dir does: llava_train/train/identity.py.
    resume: str = "false"
    # Resume (trainer.resume=PATH) from a checkpoint of another run (other configuration or data).
    resume_other_run: bool = False
    # Start anew in an output_dir that holds a run: the old run is moved aside to <output_dir>.<its run id>.
    overwrite_output_dir: bool = False
    # Order of training samples: random (seeded) | sequential (e.g. to compare runs rank for rank).
    data_order: DataOrder = DataOrder.random
    # Signals that save a checkpoint and stop cleanly (SLURM preemption sends SIGTERM, or SIGUSR1 with --signal).
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO; stage 0 means plain (DDP or single process).

    Rendered by llava_train.train.distributed.deepspeed_config into a DeepSpeed JSON dict whose batch,
    clipping, precision and bucket sizes are "auto" (HF Trainer fills them from TrainingArguments).
    """

    stage: int = 0  # 0 (off) | 2 | 3
    offload_optimizer: bool = False  # optimizer state and step on the CPU (ZeRO-Offload)
    offload_param: bool = False  # ZeRO-3 only: parameters on the CPU between uses
    # Overlap gradient reduction with backward. None: on with a CUDA GPU, off on CPU (gloo).
    overlap_comm: Optional[bool] = None
    # With offload_optimizer: DeepSpeed's vectorised CPU Adam (AdamW, a C++ op built on first use, ~2.5
    # CPU-minutes, then cached; the per-module learning-rate groups are kept). None: on whenever the optimizer
    # is offloaded (DeepSpeed's own default); false: the torch optimizer steps on the offloaded state (slower).
    cpu_adam: Optional[bool] = None
    # ZeRO-3: gather the partitioned weights into 16-bit full tensors when saving (needed for adapters).
    gather_16bit_weights_on_model_save: bool = True
    # ZeRO-3: parameters smaller than this stay whole on every rank. None: "auto" (10 x hidden size).
    param_persistence_threshold: Optional[int] = None


@dataclass
class FsdpConfig:
    """PyTorch FSDP2 through HF Trainer / accelerate: the second sharding engine (instead of DeepSpeed; GPUs
    only). Rendered by llava_train.train.distributed.fsdp_arguments; mixed precision follows model.dtype and
    activation checkpointing follows trainer.gradient_checkpointing (FSDP's own, applied per decoder layer)."""

    enabled: bool = False
    # true: full shard (parameters re-sharded after forward, like ZeRO-3); false: kept gathered until the
    # backward (fewer all-gathers, more memory, like ZeRO-2).
    reshard_after_forward: bool = True
    cpu_offload: bool = False  # parameters, gradients and optimizer step on the CPU
    # Checkpoints: SHARDED_STATE_DICT (one file per rank, fast) | FULL_STATE_DICT. The final adapter is
    # always gathered into one full file.
    state_dict_type: str = "SHARDED_STATE_DICT"
    # Rank 0 reads the checkpoint, the others start empty and receive the weights by broadcast.
    cpu_ram_efficient_loading: bool = True


@dataclass
class EvalConfig:
    """Generation eval after training (greedy exact match on the eval split)."""

    enabled: bool = True
    max_new_tokens: int = 16
    batch_size: int = 16
    show_samples: int = 5
    # During training: eval loss and generation metrics every N optimizer steps (0: only after training).
    # Under ZeRO-3 every rank generates its shard of the eval set with synced_gpus (see README).
    every_steps: int = 0
    # Eval samples used by the in-training generation eval (None: the whole eval split).
    max_samples: Optional[int] = None
    # Sample predictions (with their images) logged to the tracker's table at each eval.
    table_rows: int = 16
    # Greedy by default; do_sample=true samples with temperature / top_p.
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class LoggerConfig:
    """Experiment tracking (rank 0 only). A plain JSONL log and a loss / accuracy PNG are always written."""

    # The tracker, through HF Trainer's own integration (report_to): none | wandb | tensorboard | mlflow | trackio.
    backend: Tracker = Tracker.none
    project: str = "llava-train"
    entity: Optional[str] = None
    # Run name. Empty: the Hydra job name and run folder (e.g. "train/14-03-12"), or the output folder name.
    name: str = ""
    tags: list[str] = field(default_factory=list)
    # online | offline | auto (auto: $WANDB_MODE if set, else offline when api.wandb.ai is unreachable).
    mode: WandbMode = WandbMode.auto
    # Where wandb keeps its run folder. Empty: the training output_dir.
    dir: str = ""


@dataclass
class TrainJobConfig:
    """`llava train`: everything one training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    # Where checkpoints, the final adapter and metrics.json go. Empty: Hydra's run folder.
    output_dir: str = ""
    seed: int = 42
