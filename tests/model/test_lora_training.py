"""LoRA training changes exactly the LoRA weights and the fully trained modules; nothing else moves."""

import torch

from conftest import DEMO
from llava_train.config import DataConfig, ModelConfig, PeftConfig, TrainJobConfig
from llava_train.train.recipe import build_datasets, build_model, build_trainer


def _job(tmp_path, **peft) -> TrainJobConfig:
    job = TrainJobConfig(
        model=ModelConfig(path="tiny", modules_to_save=["lm_head", "embed_tokens"]),
        data=DataConfig(train_path=str(DEMO / "train.json"), max_length=512),
        peft=PeftConfig(**peft),
    )
    job.trainer.max_steps = 3
    job.trainer.per_device_train_batch_size = 4
    job.trainer.disable_tqdm = True
    job.trainer.save_steps = 1000
    job.optim.lr = 1e-2
    job.output_dir = str(tmp_path)
    return job


def _train_and_diff(job, processor, tiny_dir):
    train_ds, _ = build_datasets(job.data, job.model, processor)
    model = build_model(job.model, job.peft, str(tiny_dir))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer, _ = build_trainer(job, model, train_ds, processor, __import__("pathlib").Path(job.output_dir))
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    return model, changed, set(before)


def test_lora_changes_only_adapter_and_saved_modules(tmp_path, processor, tiny_dir):
    model, changed, names = _train_and_diff(_job(tmp_path), processor, tiny_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable  # every trainable parameter moved, and nothing else
    for n in changed:
        assert "lora_" in n or ".modules_to_save." in n, n
    # every LoRA layer sits in the language model, none in the vision tower
    lora = {n for n in changed if "lora_" in n}
    assert lora and all(".language_model.layers." in n for n in lora)
    kinds = {n.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for n in changed if ".modules_to_save." in n}
    assert kinds == {"multi_modal_projector", "lm_head", "embed_tokens"}
    frozen = names - changed
    assert any("vision_tower" in n for n in frozen) and not any("vision_tower" in n for n in changed)
    # the original copies of fully trained modules are untouched
    assert any("multi_modal_projector.original_module" in n for n in frozen)


def test_projector_frozen_when_asked(tmp_path, processor, tiny_dir):
    _, changed, _ = _train_and_diff(_job(tmp_path, train_projector=False), processor, tiny_dir)
    assert not any("multi_modal_projector" in n for n in changed)
    assert any("lora_" in n for n in changed)
