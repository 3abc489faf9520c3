"""Every value means what it says: values HF would reinterpret, or that would fail late or obscurely, are
refused up front (before anything loads), each with its own message."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import DEMO
from llava_train.cli import CONFIG_DIR
from llava_train.config.jobs import ExportConfig
from llava_train.export.run import check_export
from llava_train.train.validate import ConfigError, check_train, looks_local


def job(*overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=[f"data.train_path={DEMO / 'train.json'}",
                                                               "data.eval_path=null", *overrides]))


@pytest.mark.parametrize("override, message", [
    ("trainer.max_steps=0", "trainer.max_steps=0: use a positive number of optimizer steps, or -1"),
    ("trainer.max_steps=-5", "trainer.max_steps=-5: use a positive number"),
    ("optim.warmup_ratio=1.0", "optim.warmup_ratio=1.0: the fraction of training spent warming up must be in [0, 1)"),
    ("optim.warmup_ratio=-0.1", "optim.warmup_ratio=-0.1"),
    ("eval.batch_size=0", "eval.batch_size=0 must be >= 1"),
    ("trainer.per_device_eval_batch_size=0", "trainer.per_device_eval_batch_size=0 must be >= 1"),
    ("trainer.per_device_train_batch_size=0", "trainer.per_device_train_batch_size must be >= 1"),
    ("model.path=./checkpoints/my-llava", "model.path='./checkpoints/my-llava': no such folder; a hub id looks like "
                                          "org/name"),
    ("model.path=/models/llava/v1.6", "no such folder; a hub id looks like org/name"),
    ("trainer.resume=auto trainer.overwrite_output_dir=true", "choose one"),
])
def test_bad_value_refused_with_its_message(override, message):
    with pytest.raises(ConfigError) as e:
        check_train(job(*override.split()))
    assert message in str(e.value)
    assert len(e.value.problems) == 1  # reported once, not followed by a failing config.json read


def test_good_values_pass():
    check_train(job("trainer.max_steps=3", "optim.warmup_ratio=0.0", "eval.batch_size=1"))
    assert not looks_local("llava-hf/llava-v1.6-mistral-7b-hf") and looks_local("runs/a/final")
    assert looks_local("~/models/x") and looks_local("./x") and not looks_local("tiny")


def test_export_refuses_unknown_dtype_and_unfinished_run(tmp_path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):  # a closed choice: refused at compose
        with pytest.raises(ConfigCompositionException) as e:
            compose("export", overrides=["export.source=x", "export.dtype=fp8"])
    assert "fp8" in str(e.value.__cause__ or e.value) and "bf16" in str(e.value.__cause__ or e.value)
    run = tmp_path / "run"  # a training output whose run was interrupted: config, log, checkpoints, no final/
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {path: tiny}\n")
    (run / "run.json").write_text("{}")
    with pytest.raises(ConfigError) as e:
        check_export(ExportConfig(source=str(run)), tmp_path / "out")
    text = str(e.value)
    assert "is a training output without final/" in text and "trainer.resume=auto" in text
    assert f"export.source={run / 'checkpoint-N'}" in text
    with pytest.raises(ConfigError, match="no such folder"):
        check_export(ExportConfig(source=str(tmp_path / "nope")), tmp_path / "out")
