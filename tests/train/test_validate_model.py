"""Up-front validation of model settings: every problem is collected into one ConfigError before any weights
load. The checkpoint here is a folder holding only config.json (no weights at all), so a check that
needed weights could not pass; a valid configuration on the same folder passes (control)."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from conftest import DEMO
from llava_train.config import DataConfig, ModelConfig, TrainJobConfig
from llava_train.train.validate import ConfigError, check_train


@pytest.fixture
def config_only(tiny_dir, tmp_path):
    """A checkpoint folder with config.json and no weights; `dtype` rewritable."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_dir / "config.json", folder / "config.json")

    def make(dtype: str = "float32"):
        cfg = json.loads((folder / "config.json").read_text())
        cfg["dtype"] = dtype
        (folder / "config.json").write_text(json.dumps(cfg))
        assert not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin"))
        return str(folder)

    return make


def _job(path: str, **model) -> TrainJobConfig:
    job = TrainJobConfig(model=ModelConfig(path=path, **model), data=DataConfig(train_path=str(DEMO / "train.json")))
    job.trainer.max_steps = 10
    return job


def _problems(job) -> list[str]:
    with pytest.raises(ConfigError) as e:
        check_train(job)
    return e.value.problems


def _one(job, *needles) -> str:
    problems = _problems(job)
    assert len(problems) == 1, problems
    for needle in needles:
        assert needle in problems[0], problems[0]
    return problems[0]


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_valid_settings_pass_without_weights(config_only, method):
    job = _job(config_only(), modules_to_save=["lm_head", "embed_tokens"])
    job.peft.method = method
    job.trainer.gradient_checkpointing = True
    job.peft.train_vision_tower = True
    check_train(job)


def test_8bit_with_deepspeed_refused(config_only):
    job = _job(config_only())
    job.peft.method, job.peft.bits, job.deepspeed.stage = "qlora", 8, 2
    _one(job, "peft.bits=8", "DeepSpeed")
    job.deepspeed.stage = 0
    check_train(job)


def test_fp16_with_bf16_weights_refused(config_only):
    job = _job(config_only("bfloat16"), dtype="fp16")
    _one(job, "model.dtype=fp16", "bf16")
    job.model.dtype = "bf16"
    check_train(job)


def test_reentrant_checkpointing_without_input_grads_refused(config_only):
    job = _job(config_only(), checkpoint_reentrant=True, input_require_grads=False)
    job.trainer.gradient_checkpointing = True
    _one(job, "model.input_require_grads=true")
    job.model.checkpoint_reentrant = None  # non-reentrant outside ZeRO-3: no input grads needed
    check_train(job)
    job.deepspeed.stage = 3  # ZeRO-3 picks reentrant checkpointing
    _one(job, "model.input_require_grads=true")


def test_global_batch_that_does_not_divide(config_only, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    job = _job(config_only())
    job.trainer.per_device_train_batch_size, job.trainer.gradient_accumulation_steps = 4, 2
    job.trainer.global_batch_size = 30
    _one(job, "trainer.global_batch_size=30", "world size 2", "not a multiple of", "8")
    job.trainer.global_batch_size = 32
    _one(job, "set trainer.gradient_accumulation_steps=4")
    job.trainer.gradient_accumulation_steps = 4
    check_train(job)


def test_lora_regex_matching_nothing(config_only):
    job = _job(config_only())
    job.peft.target_modules = r"language_model\.layers\.\d+\.attn\.q_proj"  # no such module: it is self_attn
    _one(job, "peft.target_modules", "matches no linear layer")


def test_lora_regex_matching_vision_tower_by_accident(config_only):
    job = _job(config_only())
    job.peft.target_modules = r".*\.(q|k|v|o)_proj"  # leaf-name style: also CLIP's q/k/v_proj
    _one(job, "vision-tower layer", "model.vision_tower.", "peft.train_vision_tower=true")
    job.peft.train_vision_tower = True  # explicit opt-in
    check_train(job)


def test_quantisation_skip_by_short_names_refused(config_only):
    job = _job(config_only())
    job.peft.method = "qlora"
    job.peft.quant_skip_modules = ["vision_tower", "multi_modal_projector", "lm_head"]
    problems = _problems(job)
    assert any("'vision_tower' is no full module-name prefix" in p for p in problems)
    assert any("does not cover model.vision_tower: it would be quantised" in p for p in problems)
    assert any("does not cover model.multi_modal_projector" in p for p in problems)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_package_refused(config_only):
    job = _job(config_only("bfloat16"), dtype="bf16", attn_implementation="flash_attention_2")
    _one(job, "flash-attn package is not installed")


def test_every_problem_in_one_error(config_only, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    job = _job(config_only("bfloat16"), dtype="fp16", modules_to_save=["lm_haed"],
               checkpoint_reentrant=True, input_require_grads=False)
    job.peft.method, job.peft.bits, job.deepspeed.stage = "qlora", 8, 3
    job.peft.target_modules = r"nothing"
    job.trainer.gradient_checkpointing = True
    job.trainer.global_batch_size = 7
    job.optim.vision_lr = -1.0
    problems = _problems(job)
    for needle in ["peft.bits=8", "model.dtype=fp16",
                   "model.input_require_grads=true", "trainer.global_batch_size=7", "peft.target_modules='nothing'",
                   "'lm_haed' names no module", "optim.vision_lr"]:
        assert sum(needle in p for p in problems) == 1, (needle, problems)
    assert len(problems) == 7  # (a bad closed choice such as attn_implementation=flash fails at composition)


def test_unreadable_checkpoint_reported(tmp_path):
    (tmp_path / "not-a-checkpoint").mkdir()  # a folder without config.json (a missing one: test_validate_values)
    job = _job(str(tmp_path / "not-a-checkpoint"))
    _one(job, "cannot read its config.json")
