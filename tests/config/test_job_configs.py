"""The eval / export / chat subcommands' configs compose over their schemas; the logger group exists."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llava_train.cli import COMMANDS, CONFIG_DIR
from llava_train.config.jobs import ChatJobConfig, EvalJobConfig, ExportJobConfig
from llava_train.config.schema import TrainJobConfig


def _compose(name, overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose(config_name=name, overrides=overrides))


@pytest.mark.parametrize("name,overrides,schema", [
    ("eval", ["model.path=some/folder"], EvalJobConfig),
    ("export", ["export.source=some/run"], ExportJobConfig),
    ("chat", ["model.path=some/folder", "prompt=hi"], ChatJobConfig),
])
def test_job_config_composes(name, overrides, schema):
    assert name in COMMANDS
    job = _compose(name, overrides)
    assert isinstance(job, schema)


def test_export_output_defaults_next_to_source():
    assert _compose("export", ["export.source=runs/a"]).output_dir == "runs/a/export"


def test_logger_group():
    assert _compose("train", []).logger.backend == "none"
    job = _compose("train", ["logger=wandb", "logger.tags=[a,b]"])
    assert isinstance(job, TrainJobConfig) and job.logger.backend == "wandb" and job.logger.tags == ["a", "b"]


def test_missing_model_path_fails():
    with pytest.raises(Exception, match="path"):
        _compose("eval", [])
