"""`trainer.*` reaches every TrainingArguments field (HF's type, default and help); typos name close matches;
closed choices are enums that Hydra refuses at composition."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import TrainingArguments

from llava_train.cli import CONFIG_DIR, main, trainer_key_problems
from llava_train.config.hf_args import OWNED, hf_fields, value_problems
from llava_train.train.recipe import training_arguments


def _job(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="train", overrides=overrides))


def test_hf_fields_reach_training_arguments(tmp_path):
    job = _job(["trainer.optim=adamw_bnb_8bit", "trainer.eval_strategy=steps", "trainer.eval_steps=5",
                "trainer.dataloader_drop_last=true", "trainer.torch_compile=true", "logger=tensorboard"])
    args = training_arguments(job, tmp_path)
    assert isinstance(args, TrainingArguments)
    assert args.optim == "adamw_bnb_8bit" and args.eval_strategy == "steps" and args.eval_steps == 5
    assert args.dataloader_drop_last and args.torch_compile
    assert args.report_to == ["tensorboard"]  # the logger group is the one way to pick a tracker
    # the project's own keys still win where they mean something: model=tiny's recipe, optim.lr
    assert args.max_steps == 400 and args.per_device_train_batch_size == 16 and args.learning_rate == 2e-3


def test_tf32_reaches_hf_which_validates_it(tmp_path):
    job = _job(["trainer.tf32=true"])
    assert job.trainer.tf32 is True
    import torch

    if torch.cuda.is_available():
        assert training_arguments(job, tmp_path).tf32 is True
    else:  # HF's own check: the value got there
        with pytest.raises(ValueError, match="tf32"):
            training_arguments(job, tmp_path)


def test_every_hf_field_is_a_trainer_key_or_owned():
    job = _job([])
    for name in hf_fields():
        assert hasattr(job.trainer, name) != (name in OWNED) or name == "gradient_checkpointing", name
    assert not hasattr(job.trainer, "report_to")  # logger=... is the one way
    assert job.trainer.optim == TrainingArguments.__dataclass_fields__["optim"].default  # HF's default


def test_hf_field_types_checked_at_composition():
    with pytest.raises(Exception, match="tf32"):
        _job(["trainer.tf32=maybe"])


def test_trainer_typo_names_close_matches_with_hf_help(capsys):
    problems = trainer_key_problems(["trainer.optm=adamw_torch", "trainer.eval_strateg=steps",
                                     "trainer.learning_rate=1e-4", "trainer.optim=adamw_torch", "model.dtype=bf16"])
    assert len(problems) == 3, problems
    assert "trainer.optim" in problems[0] and "The optimizer to use" in problems[0]  # HF's own help text
    assert "trainer.eval_strategy" in problems[1] and "When to run evaluation" in problems[1]
    assert problems[2] == "trainer.learning_rate is set by optim.lr"
    with pytest.raises(SystemExit) as e:
        main(["train", "trainer.optm=adamw_torch"])
    assert e.value.code == 2 and "did you mean: trainer.optim" in capsys.readouterr().err


def test_help_shows_hf_default_help_and_choices(capsys):
    main(["train", "--help", "trainer.optim"])
    out = capsys.readouterr().out
    assert "trainer.optim (default: 'adamw_torch_fused'): The optimizer to use" in out
    assert "adamw_bnb_8bit" in out and "paged_adamw_8bit" in out
    main(["train", "--help", "trainer.lerning_rate"])
    assert "trainer.learning_rate (set by optim.lr)" in capsys.readouterr().out


def test_hf_choice_values_checked_against_hf_enums():
    job = _job(["trainer.optim=adamw_torchh", "trainer.save_strategy=step"])
    problems = value_problems(job.trainer)
    assert any("trainer.optim='adamw_torchh'" in p and "adamw_torch" in p for p in problems), problems
    assert any("trainer.save_strategy='step'" in p and "steps" in p for p in problems), problems
    assert value_problems(_job([]).trainer) == []


@pytest.mark.parametrize("override,choices", [
    ("model.family=mistrall", "mistral, vicuna, chatml, llama3, qwen"),
    ("model.dtype=bfloat16", "fp32, bf16, fp16"),
    ("peft.method=lorra", "lora, qlora, full"),
    ("data.overflow=truncate", "drop_turns, skip, error"),
    ("logger.backend=tensorbord", "none, wandb, tensorboard, mlflow, trackio"),
    ("model.attn_implementation=flash", "sdpa, eager, flash_attention_2"),
])
def test_enum_typo_fails_at_composition(override, choices):
    with pytest.raises(Exception) as e:
        _job([override])
    assert choices in str(e.value.__cause__ or e.value)


def test_choices_read_as_plain_strings():
    job = _job(["model.family=vicuna"])
    assert job.model.family == "vicuna" and f"{job.model.family}" == "vicuna" and {"vicuna": 1}[job.model.family]
    assert OmegaConf.to_yaml(OmegaConf.structured(job)).count("family: vicuna") == 1


def test_config_file_is_yaml_the_schema_reloads(tmp_path):
    """What `llava train` saves (config.yaml) loads back into the typed schema."""
    from llava_train.config.schema import TrainJobConfig

    job = _job(["peft=qlora", "trainer.optim=paged_adamw_8bit"])
    path = Path(tmp_path) / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.to_container(OmegaConf.structured(job), resolve=True)))
    back = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainJobConfig), OmegaConf.load(path)))
    assert back.peft.method == "qlora" and back.trainer.optim == "paged_adamw_8bit"
