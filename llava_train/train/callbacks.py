"""Callbacks a training run uses beyond the loss: in-training generation eval and tracking.

- `GenerationEval`: at each evaluation HF schedules (`trainer.eval_strategy`/`eval_steps`, or the
  shorthand `eval.every_steps`), after HF's eval loss (its own evaluation loop, so DDP/DeepSpeed sharding
  and gathering are HF's), the generation metrics (exact /
  contains match, per question type). Under ZeRO-3 every rank generates its shard with
  `synced_gpus=True` (see `llava_train.evaluate.generate`).
- `Tracking` (rank 0 only): the resolved config (`config.yaml`, needed by `llava export`), a plain JSONL
  log (`log.jsonl`) always (HF's `state.log_history`, which checkpoints carry: a resumed run's log and
  curves continue its history), throughput, a loss / eval-accuracy PNG next to each checkpoint and in the
  output folder. The tracker itself (`logger=wandb|tensorboard|mlflow|trackio`) is HF Trainer's own
  integration (`report_to`), which logs the metrics; on top of it, with wandb, the run is started here
  (project, entity, tags, offline when there is no network, the resolved config) and gets a table of
  sample predictions with their images.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from transformers import TrainerCallback

from llava_train.config.schema import EvalConfig, LoggerConfig, TrainJobConfig
from llava_train.evaluate.generate import Prediction, generate_predictions, metrics
from llava_train.files import write_text_atomic
from llava_train.ranks import is_main_process

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
PLOT_FILE = "training_curves.png"
WANDB_HOST = ("api.wandb.ai", 443)


def run_name(cfg: LoggerConfig, out: Path) -> str:
    """The configured name, else the Hydra job (subcommand config, run folder, multirun job number), else
    the output folder's name."""
    if cfg.name:
        return cfg.name
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hc = HydraConfig.get()
        name = f"{hc.job.config_name}/{Path(hc.runtime.output_dir).name}"
        return name if hc.job.get("num") is None else f"{name}#{hc.job.num}"
    return out.name


def report_to(cfg: LoggerConfig) -> list[str]:
    """`TrainingArguments.report_to` for the chosen tracker (HF's integration of it logs the metrics)."""
    return [] if cfg.backend == "none" else [str(cfg.backend)]


def wandb_mode(cfg: LoggerConfig) -> str:
    """online | offline. `auto`: $WANDB_MODE when set, else offline unless api.wandb.ai answers."""
    if cfg.mode != "auto":
        return str(cfg.mode)
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    try:
        socket.create_connection(WANDB_HOST, timeout=2).close()
        return "online"
    except OSError:
        return "offline"


def plot_curves(history: list[dict[str, Any]], path: Path) -> Optional[Path]:
    """Train / eval loss and eval accuracy against the step, as a PNG (no display needed)."""
    from matplotlib.figure import Figure

    def series(key):
        pts = [(h["step"], h[key]) for h in history if isinstance(h.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig = Figure(figsize=(9, 3.5))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        x, y = series(key)
        if x:
            ax_loss.plot(x, y, marker="." if len(x) < 50 else None, label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_title("loss")
    ax_loss.legend(loc="upper right")
    x, y = series("eval_accuracy")
    if x:
        ax_acc.plot(x, y, marker="o", label="exact match")
    x, y = series("eval_contains_accuracy")
    if x:
        ax_acc.plot(x, y, marker="x", linestyle="--", label="contains")
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_xlabel("step")
    ax_acc.set_title("eval accuracy")
    if x:
        ax_acc.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path


class Tracking(TrainerCallback):
    """Rank-0 tracking: config.yaml, log.jsonl, PNG curves, and optionally a wandb run."""

    def __init__(self, cfg: LoggerConfig, job: TrainJobConfig, out: Path, eval_ds=None, is_main: bool = True):
        self.cfg = cfg
        self.out = out
        self.eval_ds = eval_ds
        self.is_main = is_main
        self.history: list[dict[str, Any]] = []
        self.wandb = None
        self._last = (0, time.time())
        self.config = OmegaConf.to_container(OmegaConf.structured(job), resolve=True)
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / CONFIG_FILE).write_text(OmegaConf.to_yaml(self.config))
            (out / LOG_FILE).write_text("")

    def start(self) -> None:
        """Before training: start the wandb run HF's WandbCallback then logs into (it reuses `wandb.run`);
        MLflow's experiment defaults to logger.project. Other trackers need nothing here."""
        if not self.is_main:
            return
        if self.cfg.backend == "mlflow":
            os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", self.cfg.project)
        if self.cfg.backend != "wandb":
            return
        import wandb

        mode = wandb_mode(self.cfg)
        self.wandb = wandb.init(project=self.cfg.project, entity=self.cfg.entity, name=run_name(self.cfg, self.out),
                                tags=list(self.cfg.tags), config=self.config, dir=self.cfg.dir or str(self.out),
                                mode=mode, reinit="finish_previous")
        log.info(f"wandb: run {self.wandb.name!r} ({mode}) in {self.wandb.dir}")

    # --- events -------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (state.global_step, time.time())
        if self.is_main and state.log_history:  # resumed: the history so far comes from the checkpoint
            self.history = [dict(h) for h in state.log_history]
            write_text_atomic(self.out / LOG_FILE, "".join(json.dumps(h) + "\n" for h in self.history))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.is_main or not logs:
            return
        row = {"step": state.global_step, "time": round(time.time(), 3), **logs}
        if "loss" in logs:  # a training log: throughput since the previous one
            step0, t0 = self._last
            now = time.time()
            if state.global_step > step0 and now > t0:
                sps = (state.global_step - step0) / (now - t0)
                samples = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
                row["steps_per_second"] = round(sps, 4)
                row["samples_per_second"] = round(sps * samples, 3)
            self._last = (state.global_step, now)
        elif any(k.startswith("eval_") for k in logs):  # throughput counts training time only
            self._last = (state.global_step, time.time())
        entry = state.log_history[-1] if state.log_history else None
        if entry is not None and all(entry.get(k) == v for k, v in logs.items()):
            # the entry HF just added: our extras go into it too, so checkpoints carry them across a resume
            entry.update({k: v for k, v in row.items() if k not in logs})
        self._record(row, logged=logs)

    def write_curves(self, folder: Path, state=None) -> None:
        """The curves so far into a checkpoint being written (called by the trainer before sealing it)."""
        if self.is_main:
            plot_curves(self.history, folder / PLOT_FILE)

    def on_train_end(self, args, state, control, **kwargs):
        if self.is_main:
            plot_curves(self.history, self.out / PLOT_FILE)

    # --- called by the recipe and GenerationEval ----------------------------------------------
    def log_predictions(self, step: int, preds: list[Prediction], rows: int, key: str = "eval/predictions") -> None:
        """A wandb table of sample predictions with their images."""
        if not self.is_main or self.wandb is None or self.eval_ds is None:
            return
        import wandb

        from llava_train.data.images import load_rgb

        by_id = {self.eval_ds.conversation(i).id: self.eval_ds.conversation(i) for i in range(len(self.eval_ds))}
        table = wandb.Table(columns=["step", "id", "image", "question", "reference", "prediction", "exact"])
        for p in preds[:rows]:
            conv = by_id.get(p.id)
            image = None
            if conv is not None and conv.images:
                image = wandb.Image(load_rgb(conv.images[0], self.eval_ds.image_root, conv, 0))
            table.add_data(step, p.id, image, p.question, p.reference, p.prediction, p.exact)
        # HF's WandbCallback plots against train/global_step (its define_metric); wandb's own step is its
        self.wandb.log({key: table, "train/global_step": step})

    def finish(self, results: dict[str, Any], step: int, rows: int = 16) -> None:
        """Final metrics (JSONL, plot, wandb summary, table of the final eval's predictions.jsonl);
        closes the wandb run."""
        if not self.is_main:
            return
        preds_file = self.out / "predictions.jsonl"
        preds = []
        if preds_file.exists():
            for line in preds_file.read_text().splitlines():
                row = json.loads(line)
                preds.append(Prediction(row["id"], row["question"], row["reference"], row["prediction"]))
        final = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._record({"step": step, "final": True, **final})
        plot_curves(self.history, self.out / PLOT_FILE)
        if self.wandb is not None:
            if preds:
                self.log_predictions(step, preds, rows, key="final/predictions")
            for k, v in final.items():
                self.wandb.summary[f"final/{k}"] = v
            self.wandb.finish()
            self.wandb = None

    def _record(self, row: dict[str, Any], logged: Any = ()) -> None:
        """Append to log.jsonl; to wandb only what HF's WandbCallback did not log (`logged`: its keys)."""
        self.history.append(row)
        with open(self.out / LOG_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None and not row.get("final"):
            extra = {f"train/{k}": v for k, v in row.items() if k not in ("step", "time") and k not in logged
                     and isinstance(v, (int, float)) and not isinstance(v, bool)}
            if extra:
                self.wandb.log({**extra, "train/global_step": row["step"]})


class GenerationEval(TrainerCallback):
    """At each evaluation HF runs (its eval loss first): generation metrics on all ranks, logged through the
    trainer."""

    def __init__(self, trainer, eval_ds, tokenizer, cfg: EvalConfig, tracking: Tracking):
        self.trainer = trainer
        self.eval_ds = eval_ds
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.tracking = tracking
        self.indices = eval_indices(cfg, eval_ds)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        c = self.cfg
        preds = generate_predictions(model, self.eval_ds, self.tokenizer, batch_size=c.batch_size,
                                     max_new_tokens=c.max_new_tokens, indices=self.indices, do_sample=c.do_sample,
                                     temperature=c.temperature, top_p=c.top_p)
        m = metrics(preds)
        logs = {"eval_accuracy": m["exact_match"], "eval_contains_accuracy": m["contains_match"]}
        logs.update({f"eval_accuracy_{t}": v for t, v in m.get("per_question_type", {}).items()})
        self.trainer.log(logs)
        self.tracking.log_predictions(state.global_step, preds, c.table_rows)


def eval_indices(cfg: EvalConfig, eval_ds) -> range:
    """The eval samples the in-training eval uses: the first eval.max_samples (all when null)."""
    return range(len(eval_ds) if cfg.max_samples is None else min(cfg.max_samples, len(eval_ds)))


def in_training_eval_set(cfg: EvalConfig, eval_ds):
    """The set HF's evaluation loop runs on during training (None without an eval split)."""
    from torch.utils.data import Subset

    return None if eval_ds is None else Subset(eval_ds, list(eval_indices(cfg, eval_ds)))


def attach_callbacks(trainer, cfg: TrainJobConfig, eval_ds, tokenizer, out: Path) -> Tracking:
    """Add tracking (always) and the generation metrics to HF's scheduled evaluations (when it has any)."""
    tracking = Tracking(cfg.logger, cfg, out, eval_ds, is_main=is_main_process())
    tracking.start()
    trainer.add_callback(tracking)
    if hasattr(trainer, "checkpoint_writers"):
        trainer.checkpoint_writers.append(tracking.write_curves)
    if eval_ds is not None and cfg.eval.enabled and trainer.args.eval_strategy != "no":
        # HF's evaluation loop (sharded and gathered by HF) keeps only the loss (no logits gathered)
        trainer.args.prediction_loss_only = True
        trainer.add_callback(GenerationEval(trainer, eval_ds, tokenizer, cfg.eval, tracking))
    return tracking
