"""Typed configs of the subcommands other than `llava train` (their slices come from schema.py), and the
registration of every subcommand's job schema in Hydra's ConfigStore."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from llava_train.config.choices import Color, ExportDType, ExportPush, OnError, Split
from llava_train.config.schema import DataConfig, EvalConfig, ModelConfig, TrainJobConfig


@dataclass
class PreviewConfig:
    """`llava preview`: how many samples to render and where to write them."""

    num_samples: int = 3
    start: int = 0  # index of the first sample shown
    split: Split = Split.train
    # Also write one JSON object per sample (id, input_ids, labels, image_sizes, num_image_tokens).
    output: str = ""
    color: Color = Color.auto  # auto (colour on a TTY) | always | never ([[...]] around trained spans)


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
    # Also decode every image's pixels (in the worker processes): catches truncated or corrupt pixel data
    # that the header-only default cannot see. Slower (a full image decode per image).
    decode: bool = False


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
    on_error: OnError = OnError.error


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
    dtype: ExportDType = ExportDType.auto
    max_shard_size: str = "5GB"
    push_to_hub: bool = False
    repo_id: str = ""
    private: bool = True
    push: ExportPush = ExportPush.merged  # which folder to upload
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
