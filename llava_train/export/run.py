"""`llava export`: from a training output, (a) the adapter folder in PEFT format with the processor, chat
template and resolved training config, (b) a merged model that plain
`LlavaNextForConditionalGeneration.from_pretrained` loads, each with a model card (README.md), and
(c) optionally an upload to the hub (`export.push_to_hub`, `export.dry_run` lists it instead).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llava_train.config.jobs import ExportConfig
from llava_train.config.saved import load_train_config
from llava_train.config.schema import TrainJobConfig
from llava_train.export import hub
from llava_train.export.artifacts import write_adapter, write_merged
from llava_train.export.card import build_card
from llava_train.files import inside, publish, remove_staging
from llava_train.model.inference import FINAL, load_processor_for, resolve

CONFIG_FILES = ("config.yaml", ".hydra/config.yaml")  # resolved by `llava train`, else Hydra's copy
RUN_MARKERS = ("run.json", "config.yaml", "log.jsonl")  # a training output folder
MODEL_FILES = ("adapter_config.json", "config.json")  # a model folder (e.g. a checkpoint-N)


def _training_outputs(source: Path) -> tuple[str, TrainJobConfig, dict[str, Any]]:
    """(training config as YAML text, the same in the typed schema, metrics.json) from a training output folder
    (the schema's defaults when it has no config)."""
    roots = [source, source.parent] if source.name == FINAL else [source]  # a training output or its final/
    text = next(((r / f).read_text() for r in roots for f in CONFIG_FILES if (r / f).is_file()), "")
    metrics_file = next((r / "metrics.json" for r in roots if (r / "metrics.json").is_file()), None)
    metrics = json.loads(metrics_file.read_text()) if metrics_file else {}
    return text, load_train_config(text), metrics


def check_export(cfg: ExportConfig, out: Path) -> None:
    """Refuse, before anything loads: a source that does not exist or is a training output that never finished
    (no final/), and a destination that overlaps a folder read (its model folder, a local base), since writing
    there would destroy what is being exported. (export.dtype is a closed choice: checked at composition.)"""
    from llava_train.train.validate import ConfigError, model_path_problems

    problems = []
    source = Path(cfg.source)
    missing = model_path_problems(cfg.source, "export.source")  # a hub id is left to the hub
    if missing:
        problems += missing
    elif (source.is_dir() and not (source / FINAL).is_dir() and any((source / f).exists() for f in RUN_MARKERS)
          and not any((source / f).exists() for f in MODEL_FILES)):
        problems.append(f"export.source={cfg.source!r} is a training output without {FINAL}/ (the run was "
                        f"interrupted or is still running): continue it with trainer.resume=auto, or export one of "
                        f"its checkpoints (export.source={source / 'checkpoint-N'})")
    if not problems:
        resolved = resolve(cfg.source, cfg.base_model)
        read = [Path(resolved.model_dir)] + ([Path(resolved.base)] if Path(resolved.base).is_dir() else [])
        for folder in read:
            if inside(out, folder) or inside(folder, out):
                problems.append(f"output_dir={out} and the exported model {folder} overlap (one inside the other): "
                                "the export would overwrite its own source; choose output_dir outside it")
                break
    if problems:
        raise ConfigError(problems)


def run(cfg: ExportConfig, output_dir: str) -> dict[str, Any]:
    out = Path(output_dir or Path(cfg.source) / "export")
    check_export(cfg, out)
    resolved = resolve(cfg.source, cfg.base_model)
    config_text, train_cfg, metrics = _training_outputs(Path(cfg.source))
    dtype = str(cfg.dtype if cfg.dtype != "auto" else train_cfg.model.dtype)
    processor = load_processor_for(resolved, str(train_cfg.model.family) if config_text else None)
    model_path = train_cfg.model.path
    card_base = cfg.card_base_model or (model_path if model_path and model_path != "tiny" else resolved.base)
    datasets = list(cfg.datasets)
    written: dict[str, Path] = {}

    def card(kind: str):
        return build_card(kind=kind, repo_id=cfg.repo_id, base_model=card_base, datasets=datasets,
                          train_cfg=train_cfg, metrics=metrics, license=cfg.license, tags=list(cfg.tags))

    def publish_new(kind: str, write) -> None:
        """Written into a temporary folder, then renamed; an earlier export there is moved aside, not deleted."""
        staging = out / f".{kind}.partial"
        remove_staging(staging)
        write(staging)
        card(kind).save(staging / "README.md")
        moved = publish(staging, out / kind)
        if moved:
            print(f"{kind}: the earlier export there was moved to {moved}", flush=True)
        written[kind] = out / kind

    out.mkdir(parents=True, exist_ok=True)
    if cfg.adapter:
        if resolved.is_adapter:
            publish_new("adapter", lambda d: write_adapter(resolved, processor, config_text, d))
            print(f"adapter: {written['adapter']} (PEFT; base {resolved.base})", flush=True)
        else:
            print(f"adapter: skipped, {resolved.model_dir} is a full checkpoint (no adapter_config.json)", flush=True)
    if cfg.merged:
        publish_new("merged", lambda d: write_merged(resolved, processor, dtype, cfg.max_shard_size, config_text, d))
        print(f"merged: {written['merged']} ({dtype}, shards of at most {cfg.max_shard_size})", flush=True)

    result: dict[str, Any] = {"written": {k: str(v) for k, v in written.items()}}
    if cfg.push_to_hub:
        result["push"] = push(cfg, written)
    return result


def push(cfg: ExportConfig, written: dict[str, Path]) -> dict[str, Any]:
    if not cfg.repo_id:
        raise ValueError("export.push_to_hub=true needs export.repo_id=<user or org>/<name>")
    if cfg.push not in written:
        raise ValueError(f"export.push={cfg.push!r} but only {sorted(written)} were written; "
                         f"set export.{cfg.push}=true or export.push to one of them")
    folder = written[cfg.push]
    plan = hub.upload_plan(folder)
    visibility = "private" if cfg.private else "public"
    print(f"{'would upload' if cfg.dry_run else 'uploading'} {folder} to {cfg.repo_id} ({visibility}), "
          f"token from {hub.token_source()}:", flush=True)
    for name, size in plan:
        print(f"  {name:<50} {size / 1e6:10.2f} MB", flush=True)
    if cfg.dry_run:
        print("\nmodel card (README.md):\n" + (folder / "README.md").read_text(), flush=True)
        return {"dry_run": True, "repo_id": cfg.repo_id, "files": [n for n, _ in plan]}
    token = hub.find_token()
    if not token:
        raise RuntimeError("no hub token: set HF_TOKEN or run `hf auth login`")
    url = hub.upload(folder, cfg.repo_id, cfg.private, token)
    print(f"uploaded: {url}", flush=True)
    return {"dry_run": False, "repo_id": cfg.repo_id, "url": url, "files": [n for n, _ in plan]}
