"""Rendering of the DeepSpeed config, up-front refusals, and the ZeRO-3 text-only fix's invariants (1 rank)."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llava_train.cli import CONFIG_DIR
from llava_train.config import DeepSpeedConfig
from llava_train.model.quantize import quantization_config
from llava_train.train.distributed import VisionKeepAlive, deepspeed_config, use_cpu_adam
from llava_train.train.validate import ConfigError, check_train


def _job(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=overrides))


@pytest.mark.parametrize("name,stage", [("none", 0), ("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_deepspeed_group_renders(name, stage):
    ds = _job([f"deepspeed={name}"]).deepspeed
    rendered = deepspeed_config(ds)
    if stage == 0:
        assert rendered is None
        return
    assert rendered["zero_optimization"]["stage"] == stage
    # batch arithmetic, clipping and precision come from TrainingArguments, never duplicated
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert rendered[key] == "auto"
    assert rendered["bf16"]["enabled"] == "auto" and "optimizer" not in rendered
    if stage == 3:
        assert rendered["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    if name == "zero3_offload":
        assert rendered["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert rendered["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_deepspeed_auto_values_filled_by_trainer(tmp_path):
    """HF fills every "auto" from TrainingArguments (single process: world size 1)."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, gradient_accumulation_steps=2,
                             max_grad_norm=0.5, deepspeed=deepspeed_config(DeepSpeedConfig(stage=2)))
    cfg = args.hf_deepspeed_config.config
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 6 and cfg["gradient_clipping"] == 0.5


def test_qlora_with_zero3_accepted_and_8bit_refused_with_reason():
    cfg = _job(["deepspeed=zero3", "peft=qlora", "data.train_path=/nonexistent.json", "data.eval_path=null"])
    with pytest.raises(ConfigError) as err:
        check_train(cfg)  # before any weights load
    assert [p for p in err.value.problems if "data.train_path" in p] == err.value.problems  # QLoRA x ZeRO-3 is fine
    cfg = _job(["deepspeed=zero3", "peft=qlora_8bit", "data.train_path=/nonexistent.json", "data.eval_path=null"])
    with pytest.raises(ConfigError) as err:
        check_train(cfg)
    msg = [p for p in err.value.problems if "peft.bits=8" in p]
    assert msg and "deepspeed.stage=3" in msg[0] and "4-bit" in msg[0], err.value.problems


@pytest.mark.parametrize("dtype,storage,sharded,expected", [
    ("fp32", "auto", True, torch.float32), ("bf16", "auto", True, torch.bfloat16),
    ("bf16", "auto", False, torch.uint8), ("fp32", "bf16", True, torch.bfloat16)])
def test_quant_storage_auto_is_model_dtype_when_sharded(dtype, storage, sharded, expected):
    """PEFT's "QLoRA with ZeRO-3 / FSDP" recipe: packed 4-bit weights stored in the dtype of every other
    weight, so they are partitioned like them; uint8 (bitsandbytes' default) when nothing is sharded."""
    cfg = _job(["peft=qlora", f"model.dtype={dtype}", f"peft.quant_storage={storage}"])
    q = quantization_config(cfg.peft, cfg.model, sharded=sharded)
    assert q.bnb_4bit_quant_storage == expected and q.load_in_4bit
    assert q.llm_int8_skip_modules == ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def test_offload_uses_deepspeed_cpu_adam_unless_opted_out():
    ds = _job(["deepspeed=zero3_offload"]).deepspeed
    assert use_cpu_adam(ds) and "zero_force_ds_cpu_optimizer" not in deepspeed_config(ds)
    ds.cpu_adam = False
    assert not use_cpu_adam(ds) and deepspeed_config(ds)["zero_force_ds_cpu_optimizer"] is False
    assert not use_cpu_adam(_job(["deepspeed=zero3"]).deepspeed)


def test_bad_scale_out_settings_all_listed():
    cfg = _job(["deepspeed.stage=1", "deepspeed.offload_param=true", "trainer.resume=/no/such/ckpt",
                "trainer.preemption_signals=[SIGNOPE]"])
    with pytest.raises(ConfigError) as err:
        check_train(cfg)
    text = str(err.value)
    for needle in ("deepspeed.stage=1", "offload_param", "trainer.resume", "SIGNOPE"):
        assert needle in text, (needle, text)
    with pytest.raises(Exception, match="data_order"):  # a closed choice: refused at composition
        _job(["trainer.data_order=shuffled"])


def test_vision_keepalive_runs_vision_with_zero_effect(tiny_model):
    """A text-only batch through the fix: the vision tower and projector do run (so ZeRO-3 gathers them on
    this rank too), and the loss and every gradient stay exactly what they are without it."""
    model = tiny_model
    ids = torch.tensor([[1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793, 5936, 2]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    called = []
    hook = model.model.vision_tower.register_forward_hook(lambda *a: called.append(1))

    def loss_and_grads(keepalive):
        model.zero_grad()
        if keepalive:
            with keepalive.batch(batch):
                loss = model(**batch).loss
        else:
            loss = model(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = loss_and_grads(None)
    assert not called
    keep = VisionKeepAlive(model)
    kept_loss, kept = loss_and_grads(keep)
    assert called  # the vision path ran for a batch without images
    assert kept_loss == plain_loss
    for n, g in plain.items():
        assert torch.equal(g, kept[n]), n
    assert all(kept[n].abs().sum() == 0 for n in kept if "multi_modal_projector" in n)
    # a batch with images is left alone (the real forward already runs the vision path)
    called.clear()
    with keep.batch({**batch, "pixel_values": None}):
        model(**batch)
    assert not called
    keep.remove()
    hook.remove()


@pytest.mark.parametrize("name", ["full_shard", "full_shard_offload"])
def test_fsdp2_group_renders_training_arguments(name, tmp_path):
    """fsdp=full_shard renders FSDP2 settings that transformers' TrainingArguments accepts and hands to
    accelerate's FSDP plugin (version 2, per-layer wrapping, FSDP's own activation checkpointing)."""
    from transformers import TrainingArguments

    from llava_train.train.distributed import distributed_arguments

    cfg = _job([f"fsdp={name}", "trainer.gradient_checkpointing=true"])
    kwargs = distributed_arguments(cfg.deepspeed, cfg.fsdp, gradient_checkpointing=True)
    assert kwargs["deepspeed"] is None and kwargs["fsdp"] is True
    fc = kwargs["fsdp_config"]
    assert fc["version"] == 2 and fc["reshard_after_forward"] is True and fc["activation_checkpointing"] is True
    assert fc["state_dict_type"] == "SHARDED_STATE_DICT" and fc["cpu_offload"] is (name == "full_shard_offload")
    args = TrainingArguments(output_dir=str(tmp_path), **kwargs)
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["activation_checkpointing"] is True and plugin["state_dict_type"] == "SHARDED_STATE_DICT"
    assert plugin.get("cpu_offload", False) is (name == "full_shard_offload")
    assert distributed_arguments(_job([]).deepspeed, _job([]).fsdp) == {"deepspeed": None, "use_cpu": False}


def test_fsdp2_refusals_listed_with_reasons():
    from llava_train.train.distributed import check_fsdp

    cfg = _job(["fsdp=full_shard", "deepspeed=zero3", "peft=qlora", "fsdp.state_dict_type=LOCAL"])
    problems = check_fsdp(cfg.fsdp, cfg.deepspeed, cfg.peft)
    text = "\n".join(problems)
    assert "choose one engine" in text and "fsdp.state_dict_type='LOCAL'" in text
    assert "bitsandbytes/issues/1945" in text and "deepspeed=zero3" in text  # QLoRA x FSDP2: reason + way out
    if not torch.cuda.is_available():
        assert "needs GPUs" in text and "MULTI_CPU" in text
    assert check_fsdp(*[getattr(_job([]), k) for k in ("fsdp", "deepspeed", "peft")]) == []
    lora = _job(["fsdp=full_shard", "peft=lora"])
    assert [p for p in check_fsdp(lora.fsdp, lora.deepspeed, lora.peft) if "needs GPUs" not in p] == []
