"""Up-front refusals of a real run: max_length below one largest image, the demo eval set beside other
training data, both data.train_path and data.sources. No weights, no hub (tabled configs)."""

import pytest

from conftest import DEMO
from llava_train.config import DataConfig, ModelConfig, TrainJobConfig
from llava_train.config.schema import DataSourceConfig
from llava_train.model.catalog import known_config
from llava_train.train.validate import ConfigError, check_train, demo_eval_problems, image_length_problems


def test_max_length_below_the_largest_image_is_refused_with_the_numbers():
    config = known_config("llava-hf/llava-v1.6-mistral-7b-hf")
    (problem,) = image_length_problems(DataConfig(max_length=2048), config)
    for needle in ("data.max_length=2048", "2928 tokens", "336 px", "patch 14", "[672, 672]"):
        assert needle in problem
    assert image_length_problems(DataConfig(max_length=4096), config) == []


def test_check_train_lists_it_for_a_real_checkpoint_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    job = TrainJobConfig(model=ModelConfig(path="llava-hf/llava-v1.6-mistral-7b-hf", dtype="bf16"),
                         data=DataConfig(train_path=str(DEMO / "train.json"), max_length=512))
    with pytest.raises(ConfigError) as e:
        check_train(job)
    assert [p for p in e.value.problems if "2928" in p and "data.max_length=512" in p], e.value.problems


def test_demo_eval_set_beside_other_training_data_is_refused(tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text("[]")
    (problem,) = demo_eval_problems(DataConfig(train_path=str(mine), eval_path=str(DEMO / "eval.json")))
    assert "bundled demo eval set" in problem and str(mine) in problem
    sources = [DataSourceConfig(path=str(mine))]
    assert demo_eval_problems(DataConfig(sources=sources, eval_path=str(DEMO / "eval.json")))
    # the demo itself, and your own eval set, pass
    assert demo_eval_problems(DataConfig(train_path=str(DEMO / "train.json"), eval_path=str(DEMO / "eval.json"))) == []
    assert demo_eval_problems(DataConfig(train_path=str(mine), eval_path=str(mine))) == []


def test_train_path_and_sources_together_are_refused(tiny_dir):
    job = TrainJobConfig(model=ModelConfig(path=str(tiny_dir), modules_to_save=["lm_head", "embed_tokens"]),
                         data=DataConfig(train_path=str(DEMO / "train.json"),
                                         sources=[DataSourceConfig(path=str(DEMO / "eval.json"))]))
    job.trainer.max_steps = 1
    with pytest.raises(ConfigError) as e:
        check_train(job)
    assert len(e.value.problems) == 1 and "data.sources replaces data.train_path" in e.value.problems[0]
