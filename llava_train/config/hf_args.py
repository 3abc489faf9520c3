"""Every `transformers.TrainingArguments` field as a typed `trainer.*` key, with HF's own default and help.

`TrainerConfig` (schema.py) declares only the keys the project gives a meaning or a default of its own
(batch arithmetic, resume policy, preemption, data order...); `with_training_arguments` adds every other
`TrainingArguments` field to it, read from HF's dataclass, so `trainer.optim=adamw_bnb_8bit`,
`trainer.tf32=true` or `trainer.eval_strategy=steps` compose (type-checked by Hydra) and reach HF
unchanged. Fields the project sets from its own keys are listed in `OWNED` with the key to use instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from typing import Any, Optional

from transformers import TrainingArguments

# TrainingArguments fields the recipe fills from the project's own keys: where to set them instead.
OWNED = {
    "output_dir": "output_dir",
    "learning_rate": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "lr_scheduler_type": "optim.scheduler",
    "warmup_steps": "optim.warmup_ratio",
    "max_grad_norm": "optim.max_grad_norm",
    "report_to": "logger=wandb|tensorboard|mlflow|trackio|none",
    "run_name": "logger.name",
    "project": "logger.project",
    "seed": "seed",
    "bf16": "model.dtype",
    "fp16": "model.dtype",
    "gradient_checkpointing": "trainer.gradient_checkpointing (the project's key: reentrant choice, input grads)",
    "gradient_checkpointing_kwargs": "model.checkpoint_reentrant",
    "activation_checkpointing": "trainer.gradient_checkpointing",
    "activation_checkpointing_kwargs": "model.checkpoint_reentrant",
    "dataloader_num_workers": "data.num_workers",
    "dataloader_prefetch_factor": "data.prefetch_factor",
    "dataloader_persistent_workers": "data.num_workers (workers persist across epochs whenever there are any)",
    "train_sampling_strategy": "trainer.data_order",
    "remove_unused_columns": "nothing: always false (the collator needs every column)",
    "resume_from_checkpoint": "trainer.resume",
    "deepspeed": "the deepspeed group (deepspeed=zero2|zero3|...)",
    "use_cpu": "nothing: set by the launch (CPU ranks)",
    "parallelism_config": "nothing: not expressible as a config value",
    "local_rank": "nothing: set by the launcher",
    "hub_token": "HF_TOKEN or `hf auth login` (a token never goes into config.yaml or a tracker)",
}

_PLAIN = (str, int, float, bool)


def _schema_type(tp) -> Any:
    """The OmegaConf type for a TrainingArguments annotation: str/int/float/bool (Optional), list[str], else Any.
    HF's enums (`OptimizerNames | str`...) become str: values are checked against the enum by `value_problems`."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    optional = type(None) in args
    rest = []
    for a in args:
        if a is type(None):
            continue
        a = str if isinstance(a, type) and issubclass(a, enum.Enum) else a
        if a not in rest:
            rest.append(a)
    if len(rest) == 1 and rest[0] in _PLAIN:
        base = rest[0]
    elif len(rest) == 1 and typing.get_origin(rest[0]) is list and typing.get_args(rest[0]) == (str,):
        base = list[str]
    else:
        return Any
    return Optional[base] if optional else base


def hf_fields() -> dict[str, dataclasses.Field]:
    """TrainingArguments' init fields by name."""
    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init and not f.name.startswith("_")}


def _enum_of(name: str) -> Optional[type[enum.Enum]]:
    tp = typing.get_type_hints(TrainingArguments)[name]
    for a in typing.get_args(tp) or (tp,):
        if isinstance(a, type) and issubclass(a, enum.Enum):
            return a
    return None


def with_training_arguments(cls):
    """Class decorator: `cls` plus every TrainingArguments field it neither declares nor leaves to `OWNED`
    (HF's type, HF's default, HF's help text in the field metadata)."""
    own = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(TrainingArguments)
    extra = []
    for name, f in hf_fields().items():
        if name in own or name in OWNED:
            continue
        kwargs: dict[str, Any] = {"metadata": dict(f.metadata)}
        if f.default_factory is not dataclasses.MISSING:
            kwargs["default_factory"] = f.default_factory
        else:
            kwargs["default"] = f.default
        extra.append((name, _schema_type(hints[name]), dataclasses.field(**kwargs)))
    new = dataclasses.make_dataclass(cls.__name__, extra, bases=(cls,))
    new.__module__, new.__qualname__, new.__doc__ = cls.__module__, cls.__qualname__, cls.__doc__
    return new


def hf_arguments(trainer_cfg) -> dict[str, Any]:
    """The TrainingArguments keywords `trainer.*` sets: every HF field on the config not in `OWNED`."""
    return {name: getattr(trainer_cfg, name) for name in hf_fields()
            if name not in OWNED and hasattr(trainer_cfg, name)}


def field_help(name: str) -> str:
    """HF's help text for a TrainingArguments field (empty when it has none)."""
    f = hf_fields().get(name)
    return " ".join(str(f.metadata.get("help", "")).split()) if f is not None else ""


def describe_field(name: str, default: Any) -> str:
    """`trainer.<name>`: its default, HF's help text and, for HF's closed choices, the allowed values."""
    if name in OWNED:
        return f"trainer.{name} is set by {OWNED[name]}"
    text = f"trainer.{name} (default: {default!r}): {field_help(name) or 'a llava-train key (see TrainerConfig)'}"
    choices = _enum_of(name) if name in hf_fields() else None
    return text + (f"\n  choices: {', '.join(e.value for e in choices)}" if choices else "")


def key_problems(keys, declared) -> list[str]:
    """Problems with `trainer.<key>` names: unknown (with close matches and HF's help for them) or set
    by another project key (`OWNED`). `declared`: the keys TrainerConfig accepts."""
    problems = []
    known = sorted(set(declared) | set(hf_fields()))
    for key in keys:
        if key in OWNED:
            problems.append(f"trainer.{key} is set by {OWNED[key]}")
        elif key not in declared:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = "; ".join(f"trainer.{c} (set by {OWNED[c]})" if c in OWNED else
                             f"trainer.{c}" + (f" ({field_help(c)[:160]})" if field_help(c) else "") for c in close)
            problems.append(f"trainer.{key} is not a TrainerConfig key nor a TrainingArguments field"
                            + (f"; did you mean: {hint}" if hint else "; see `llava train --cfg job` for the keys"))
    return problems


def choice_problem(key: str, value: str, choices: type[enum.Enum]) -> list[str]:
    """`[problem]` when `value` is none of HF's enum `choices` (with close matches), else `[]`."""
    allowed = [e.value for e in choices]
    if value in allowed:
        return []
    close = difflib.get_close_matches(value, allowed, n=3)
    return [f"{key}={value!r} is not one of HF's {choices.__name__}"
            + (f"; did you mean {', '.join(close)}?" if close else f": {', '.join(allowed)}")]


def value_problems(trainer_cfg) -> list[str]:
    """Values of HF's closed-choice fields (optim, eval_strategy, save_strategy...) outside HF's own enum."""
    problems = []
    for name, value in hf_arguments(trainer_cfg).items():
        choices = _enum_of(name)
        if choices is not None and isinstance(value, str):
            problems += choice_problem(f"trainer.{name}", value, choices)
    return problems
