"""A training run's saved `config.yaml` read back into the typed schema (`TrainJobConfig`)."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llava_train.config.schema import TrainJobConfig

log = logging.getLogger(__name__)


def _known(node: DictConfig, values: Any, path: str, dropped: list[str]) -> Any:
    """`values` without the keys `node`'s schema does not have (recorded in `dropped`)."""
    if not isinstance(values, dict) or not isinstance(node, DictConfig):
        return values
    out = {}
    for key, value in values.items():
        if key not in node:
            dropped.append(f"{path}{key}")
        else:
            out[key] = _known(node[key], value, f"{path}{key}.", dropped)
    return out


def load_train_config(text: str) -> TrainJobConfig:
    """The typed config of a training run from its saved YAML. Keys this version does not know (a run saved
    by an older llava-train, or a TrainingArguments field of another transformers version) are dropped with
    a warning; values are type-checked and missing keys take the schema's defaults."""
    schema = OmegaConf.structured(TrainJobConfig)
    dropped: list[str] = []
    values = _known(schema, OmegaConf.to_container(OmegaConf.create(text or "{}")), "", dropped)
    if dropped:
        log.warning("saved config: ignoring keys this version does not know: %s", ", ".join(dropped))
    cfg = OmegaConf.merge(schema, values)
    if OmegaConf.is_missing(cfg.model, "path"):
        cfg.model.path = ""
    return OmegaConf.to_object(cfg)
