"""`llava <subcommand> [hydra overrides]`: dispatch to one Hydra app per subcommand.

Each subcommand composes `configs/<subcommand>.yaml` over its typed schema, so `key=value`
overrides, `-m/--multirun`, `--cfg job` and `--help` work everywhere. `python -m llava_train` is the
same entry point (for torchrun / deepspeed / accelerate launchers; the `--local_rank=N` argument the
DeepSpeed launcher adds is accepted and exported as LOCAL_RANK).

The configs come from `configs/` next to the package in a source checkout (the files people edit), or
from `llava_train/_resources/configs` in an installed wheel (copied there at build time, setup.py). Your
own config folder joins the search path with Hydra's `--config-dir DIR` (its `experiment/`, `model/`...
files are found beside ours) or `hydra.searchpath=[file:///abs/dir]`.
"""

from __future__ import annotations

import os
import re
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from llava_train.config import register_configs
from llava_train.config.demo import demo_overrides
from llava_train.resources import ROOT

CONFIG_DIR = str(ROOT / "configs")

OmegaConf.register_new_resolver("llava_root", lambda: str(ROOT), replace=True)
register_configs()


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> None:
    from llava_train.train.recipe import run

    run(OmegaConf.to_object(cfg), HydraConfig.get().runtime.output_dir)


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def plan(cfg: DictConfig) -> None:
    from llava_train.train.plan import run as run_plan

    run_plan(OmegaConf.to_object(cfg))


@hydra.main(config_path=CONFIG_DIR, config_name="preview", version_base="1.3")
def preview(cfg: DictConfig) -> None:
    from llava_train.inspection.preview import preview as run_preview

    run_preview(OmegaConf.to_object(cfg))


@hydra.main(config_path=CONFIG_DIR, config_name="doctor", version_base="1.3")
def doctor(cfg: DictConfig) -> None:
    from llava_train.inspection.doctor import doctor as run_doctor

    reports = run_doctor(OmegaConf.to_object(cfg), HydraConfig.get().runtime.output_dir)
    if any(not r.ok for r in reports):
        raise SystemExit(1)


@hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base="1.3")
def evaluate(cfg: DictConfig) -> None:
    from llava_train.evaluate.run import run

    run(OmegaConf.to_object(cfg), HydraConfig.get().runtime.output_dir)


@hydra.main(config_path=CONFIG_DIR, config_name="export", version_base="1.3")
def export(cfg: DictConfig) -> None:
    from llava_train.export.run import run

    job = OmegaConf.to_object(cfg)
    run(job.export, job.output_dir)


@hydra.main(config_path=CONFIG_DIR, config_name="chat", version_base="1.3")
def chat(cfg: DictConfig) -> None:
    from llava_train.evaluate.chat import run

    run(OmegaConf.to_object(cfg))


@hydra.main(config_path=CONFIG_DIR, config_name="sweep-report", version_base="1.3")
def sweep_report(cfg: DictConfig) -> None:
    from llava_train.train.sweep import report

    report(cfg.dir, cfg.out)


COMMANDS = {
    "train": (train, "train a LlavaNext model (LoRA / full) and evaluate it"),
    "plan": (plan, "pre-flight: memory per GPU, tokens per step, steps per epoch; no GPU, no weights"),
    "preview": (preview, "render samples as they are trained on (trained spans marked, token counts)"),
    "doctor": (doctor, "validate a whole dataset fast and print its statistics; non-zero exit on errors"),
    "eval": (evaluate, "generation eval (exact / contains match) of an adapter, merged or base model"),
    "export": (export, "adapter folder + merged model (+ model card, push to the hub)"),
    "chat": (chat, "one-shot, interactive or batch generation from images and a prompt"),
    "sweep-report": (sweep_report, "table + plot of a `llava train -m` sweep folder: llava sweep-report DIR"),
}
# subcommands whose first argument may be given bare (`llava sweep-report DIR` = `... dir=DIR`)
POSITIONAL = {"sweep-report": "dir"}
# `llava plan` composes the train config; it prints only (no run folder, no log file)
EXTRA = {"plan": ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=none",
                  "hydra/hydra_logging=none"]}


def usage() -> str:
    lines = ["usage: llava <command> [key=value ...] [--cfg job] [-m] [--help]",
             "       llava train --help trainer.<key>   (any TrainingArguments field: HF's default and help)",
             "", "commands:"]
    lines += [f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def trainer_key_problems(overrides: list[str]) -> list[str]:
    """`trainer.<key>=...` overrides naming no TrainerConfig key: close matches with HF's help, before Hydra
    (whose own message names no alternative)."""
    from dataclasses import fields

    from llava_train.config.hf_args import key_problems
    from llava_train.config.schema import TrainerConfig

    keys = [m.group(1) for o in overrides if (m := re.match(r"^[+~]{0,2}trainer\.(\w+)", o))]
    return key_problems(keys, {f.name for f in fields(TrainerConfig)})


def trainer_key_help(key: str) -> str:
    """Default and HF's help text of one `trainer` key (or the close matches when there is none)."""
    from dataclasses import fields

    from llava_train.config.hf_args import describe_field, key_problems
    from llava_train.config.schema import TrainerConfig

    declared = {f.name: f for f in fields(TrainerConfig)}
    if key not in declared:
        return "\n".join(key_problems([key], declared))
    f = declared[key]
    return describe_field(key, f.default_factory() if callable(f.default_factory) else f.default)


def strip_local_rank(argv: list[str]) -> list[str]:
    """The DeepSpeed launcher (without --no_local_rank) passes `--local_rank=N` before the script's own
    arguments: no Hydra override. Drop it; export LOCAL_RANK when the launcher did not set it."""
    rest, it = [], iter(argv)
    for arg in it:
        flag, eq, value = arg.partition("=")
        if flag in ("--local_rank", "--local-rank"):
            value = value if eq else next(it, "0")
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            rest.append(arg)
    return rest


def main(argv: list[str] | None = None) -> None:
    argv = strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name = argv[0]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    rest = argv[1:]
    if name in POSITIONAL and rest and "=" not in rest[0] and not rest[0].startswith("-"):
        rest = [f"{POSITIONAL[name]}={rest[0]}", *rest[1:]]
    if name == "train" and len(rest) == 2 and rest[0] in ("-h", "--help") and rest[1].startswith("trainer."):
        print(trainer_key_help(rest[1].removeprefix("trainer.")))  # `llava train --help trainer.optim`
        return
    problems = trainer_key_problems(rest) if name in ("train", "plan") else []
    if problems:
        print("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        raise SystemExit(2)
    rest = [*EXTRA.get(name, []), *demo_overrides(name, rest)]
    sys.argv = [f"llava {name}", *rest]
    COMMANDS[name][0]()


if __name__ == "__main__":
    main()
