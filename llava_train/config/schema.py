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
    # Gradient checkpointing (switched on by trainer.gradient_checkpointing) uses non-reentrant
    # torch.utils.checkpoint; under ZeRO-3 reentrant, because non-reentrant recomputation meets frozen
    # parameters already re-partitioned (transformers#47254). null: that choice; true/false: forced.
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
    overflow: str = "drop_turns"
    # What to do with a bad sample (missing image, bad conversation...): error | skip.
    on_error: str = "error"
    num_workers: int = 0
    max_eval_samples: Optional[int] = None
    # Input format: auto (detected per row) | llava (conversations/from/value) | messages (role/content).
    format: str = "auto"
    # Train only the last assistant reply of each sample (earlier replies become context, label -100).
    train_last_turn_only: bool = False
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

    method: str = "lora"  # lora | qlora (LoRA on a bitsandbytes-quantised base) | full
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
    quant_type: str = "nf4"  # nf4 | fp4 (4-bit only)
    double_quant: bool = True  # quantise the quantisation constants too (4-bit only)
    compute_dtype: str = ""  # fp32 | bf16 | fp16; empty: model.dtype
    # Storage dtype of packed 4-bit weights: uint8, or the model dtype so ZeRO-3 can shard them.
    quant_storage: str = "uint8"  # uint8 | bf16 | fp16 | fp32
    # Kept in full precision, by FULL module-name prefix (transformers 5 does not match short names:
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
    # Selective checkpointing: with gradient_checkpointing, checkpoint only every k-th decoder layer of the
    # language model (1: all); the others keep their activations (less recomputation, more memory).
    checkpoint_every_n_layers: int = 1
    # Activations kept in (pinned) CPU memory between forward and backward. With gradient_checkpointing:
    # the checkpointed layers' inputs (transformers' offload); without: every activation except weights.
    activation_offloading: bool = False
    # TF32 matmuls on Ampere or newer GPUs. None: on where supported (off on CPU and older GPUs).
    tf32: Optional[bool] = None
    report_to: str = "none"
    disable_tqdm: bool = False
    # When set, must equal world size x per_device_train_batch_size x gradient_accumulation_steps.
    global_batch_size: Optional[int] = None
    # Continue from a checkpoint: "auto" (the newest complete checkpoint in output_dir, else start fresh),
    # a checkpoint folder, or "false". Only checkpoints sealed by llava_train.train.resume are picked.
    resume: str = "false"
    # Order of training samples: random (seeded) | sequential (e.g. to compare runs rank for rank).
    data_order: str = "random"
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
    # With offload_optimizer: DeepSpeed's vectorised CPU Adam (AdamW, a C++ op built on first use; the
    # per-module learning-rate groups are kept). None: on with a CUDA GPU; false: the torch optimizer
    # steps on the offloaded state (slower).
    cpu_adam: Optional[bool] = None
    # ZeRO-3: gather the partitioned weights into 16-bit full tensors when saving (needed for adapters).
    gather_16bit_weights_on_model_save: bool = True
    # ZeRO-3: parameters smaller than this stay whole on every rank. None: "auto" (10 x hidden size).
    param_persistence_threshold: Optional[int] = None


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

    backend: str = "none"  # none | wandb
    project: str = "llava-train"
    entity: Optional[str] = None
    # Run name. Empty: the Hydra job name and run folder (e.g. "train/14-03-12"), or the output folder name.
    name: str = ""
    tags: list[str] = field(default_factory=list)
    # online | offline | auto (auto: $WANDB_MODE if set, else offline when api.wandb.ai is unreachable).
    mode: str = "auto"
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
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # Where checkpoints, the final adapter and metrics.json go. Empty: Hydra's run folder.
    output_dir: str = ""
    seed: int = 42


@dataclass
class PreviewConfig:
    """`llava preview`: how many samples to render and where to write them."""

    num_samples: int = 3
    start: int = 0  # index of the first sample shown
    split: str = "train"  # train | eval
    # Also write one JSON object per sample (id, input_ids, labels, image_sizes, num_image_tokens).
    output: str = ""
    color: str = "auto"  # auto (colour on a TTY) | always | never ([[...]] around trained spans)


@dataclass
class PreviewJobConfig:
    """`llava preview`: render samples exactly as they will be trained on."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)


@dataclass
class DoctorConfig:
    """`llava doctor`: validate a whole dataset from image headers, in parallel."""

    workers: int = 0  # processes; 0: all CPU cores
    include_eval: bool = True  # also check data.eval_path
    show_ids: int = 5  # sample ids listed per error kind
    bins: int = 10  # histogram bins
    # Where the histogram PNG goes. Empty: doctor.png in Hydra's run folder.
    plot: str = ""
    progress: bool = True  # progress bar (large sets)


@dataclass
class DoctorJobConfig:
    """`llava doctor`: dataset validation and statistics; exits non-zero when a sample is bad."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    doctor: DoctorConfig = field(default_factory=DoctorConfig)


@dataclass
class EvalDataConfig:
    """The data `llava eval` generates on (LLaVA JSON/JSONL or messages; last assistant turn = reference)."""

    path: str = MISSING
    # Folder that relative image paths resolve against. Empty: the data file's own folder.
    image_root: str = ""
    max_length: int = 4096
    max_samples: Optional[int] = None
    on_error: str = "error"  # error | skip


@dataclass
class EvalJobConfig:
    """`llava eval`: generation eval of an adapter, a merged model or a base model."""

    # model.path: an adapter folder, a merged/base checkpoint (folder or hub id), a training output
    # folder (its final/ is used) or "tiny". model.family renders the prompts.
    model: ModelConfig = field(default_factory=ModelConfig)
    # Adapters only: the base checkpoint, when it moved since training (default: the one recorded).
    base_model: str = ""
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Where predictions.jsonl and metrics.json go. Empty: Hydra's run folder.
    output_dir: str = ""
    seed: int = 0


@dataclass
class ExportConfig:
    """What `llava export` writes and uploads."""

    # A training output folder (its final/ and config.yaml are used) or an adapter / model folder.
    source: str = MISSING
    # The base checkpoint for an adapter, when it moved since training (default: the one recorded).
    base_model: str = ""
    adapter: bool = True  # write <output_dir>/adapter (PEFT format + processor + training config)
    merged: bool = True  # write <output_dir>/merged (merge_and_unload, plain transformers)
    # dtype of the merged weights: fp32 | bf16 | fp16 | auto (auto: the training model.dtype).
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    push_to_hub: bool = False
    repo_id: str = ""
    private: bool = True
    push: str = "merged"  # which folder to upload: merged | adapter
    dry_run: bool = False  # list what would be uploaded (and the model card) without uploading
    # Model card metadata: hub dataset ids, license, extra tags, and the base model id shown to users
    # (default: the training model.path).
    datasets: list[str] = field(default_factory=list)
    license: str = ""
    tags: list[str] = field(default_factory=list)
    card_base_model: str = ""


@dataclass
class ExportJobConfig:
    """`llava export`."""

    export: ExportConfig = field(default_factory=ExportConfig)
    # Where adapter/ and merged/ go. Empty: <export.source>/export.
    output_dir: str = ""


@dataclass
class ChatJobConfig:
    """`llava chat`: one-shot, interactive or batch generation from images and a prompt."""

    model: ModelConfig = field(default_factory=ModelConfig)
    base_model: str = ""  # adapters only, as in `llava eval`
    images: list[str] = field(default_factory=list)  # image paths for one-shot mode
    prompt: str = ""  # one-shot when set; interactive (stdin) when empty and no input file
    system: str = ""
    # Batch mode: a JSONL of {"id"?, "prompt", "images": [paths]} requests; replies go to `output`
    # (default: <input>.replies.jsonl) as {"id", "prompt", "images", "reply"}.
    input: str = ""
    output: str = ""
    max_new_tokens: int = 64
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class SweepReportConfig:
    """`llava sweep-report DIR`: table and plot of a multirun folder's runs."""

    dir: str = MISSING  # the sweep folder (hydra.sweep.dir of `llava train -m ...`)
    out: str = ""  # where sweep_report.{md,csv,png} go. Empty: the sweep folder


def register_configs() -> None:
    """Register each subcommand's job schema in Hydra's ConfigStore (its YAML lists it first)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainJobConfig)
    cs.store(name="preview_schema", node=PreviewJobConfig)
    cs.store(name="doctor_schema", node=DoctorJobConfig)
    cs.store(name="eval_schema", node=EvalJobConfig)
    cs.store(name="export_schema", node=ExportJobConfig)
    cs.store(name="chat_schema", node=ChatJobConfig)
    cs.store(name="sweep_report_schema", node=SweepReportConfig)
