"""configs/preview.yaml and configs/doctor.yaml compose over their typed schemas."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llava_train.cli import CONFIG_DIR
from llava_train.config.jobs import DoctorJobConfig, PreviewJobConfig


@pytest.mark.parametrize("name,schema", [("preview", PreviewJobConfig), ("doctor", DoctorJobConfig)])
def test_inspection_config_composes(name, schema):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=name, overrides=["model.family=chatml", "data.overflow=skip"])
    job = OmegaConf.to_object(cfg)
    assert isinstance(job, schema) and job.model.family == "chatml" and job.data.train_path.endswith("train.json")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        with pytest.raises(Exception, match="no_such_key"):
            compose(config_name=name, overrides=[f"{name}.no_such_key=1"])


def test_data_sources_compose():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "data.train_path=", "data.sources=[{path: a.parquet, weight: 2.0}, {path: b.json}]"])
    job = OmegaConf.to_object(cfg)
    assert [s.weight for s in job.data.sources] == [2.0, 1.0] and job.data.sources[1].split == "train"
