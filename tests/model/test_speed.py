"""Speed features train exactly like the plain model: the same losses over a few SGD steps and the same
trained weights (regional compile, selective checkpointing, offloading of saved activations, chunked
linear cross entropy, mask-free attention on right-padded batches); each refused up front where it
cannot apply."""

from __future__ import annotations

import pytest
import torch

from conftest import DEMO
from llava_train.config import DataConfig, ModelConfig, PeftConfig, TrainerConfig
from llava_train.data.collate import Collator
from llava_train.data.dataset import ConversationDataset
from llava_train.model.speed import OffloadActivations, speed_problems, without_padding_mask
from llava_train.train.loss import sparse_lm_loss
from llava_train.train.recipe import build_model

TINY_SAVED = ["lm_head", "embed_tokens"]  # what configs/model/tiny.yaml trains fully (random base)


@pytest.fixture(scope="module")
def batches(processor, encoder):
    path = str(DEMO / "train.json")
    ds = ConversationDataset(path, DataConfig(train_path=path), encoder, processor.image_processor)
    collate = Collator(pad_token_id=processor.tokenizer.pad_token_id)
    return [collate([ds[i] for i in idx]) for idx in ([0, 11, 17], [3, 5, 8])]  # images, multi-turn, text-only


def _model(tiny_dir, build_kw=None, **model_kw):
    """The tiny model with LoRA, the same initialisation every time."""
    torch.manual_seed(0)
    return build_model(ModelConfig(path="tiny", modules_to_save=TINY_SAVED, **model_kw), PeftConfig(),
                       str(tiny_dir), **(build_kw or {}))


def _train(model, batches, *, chunk_tokens=0, offload=None, lr=0.05):
    """Plain SGD steps: the loss of each step, then the trained parameters."""
    model.train()
    losses = []
    for batch in batches:
        with offload if offload is not None else torch.enable_grad():
            loss, _ = sparse_lm_loss(model, batch, chunk_tokens=chunk_tokens)
        loss.backward()
        loss = loss.detach()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
                    p.grad = None
        losses.append(float(loss))
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def reference(tiny_dir, batches):
    return _train(_model(tiny_dir), batches)


def _assert_same(run, reference, rtol=1e-4, atol=1e-5):
    losses, params = run
    ref_losses, ref_params = reference
    assert losses[0] != losses[-1]  # the steps did train
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=rtol, atol=atol)
    assert params.keys() == ref_params.keys()
    for n in params:
        torch.testing.assert_close(params[n], ref_params[n], rtol=rtol, atol=atol)


def test_chunked_cross_entropy_trains_like_the_sparse_head(tiny_dir, batches, reference):
    # chunks of 7 positions: several chunks per batch, the last one partial
    _assert_same(_train(_model(tiny_dir), batches, chunk_tokens=7), reference)


def test_offloaded_activations_train_like_kept_ones(tiny_dir, batches, reference):
    model = _model(tiny_dir)
    offload = OffloadActivations(model, min_numel=1, force_copy=True)  # CPU: copy every saved activation
    _assert_same(_train(model, batches, offload=offload), reference)
    assert offload.offloaded > 100  # activations really went through pack/unpack
    assert offload.kept_weights > 10  # the weights linears save (transposed views) stayed in place


def test_selective_checkpointing_trains_like_none(tiny_dir, batches, reference):
    model = _model(tiny_dir, build_kw={"gradient_checkpointing": True, "checkpoint_every_n_layers": 2})
    layers = model.get_base_model().model.language_model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    _assert_same(_train(model, batches), reference)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_blocks_train_like_eager(backend, tiny_dir, batches):
    steps = [batches[0], batches[0]]  # one shape: compiled once (a second shape would recompile, dynamic)
    reference = _train(_model(tiny_dir), steps)
    torch._dynamo.reset()
    model = _model(tiny_dir, compile=True, compile_backend=backend)
    layers = model.get_base_model().model.language_model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    _assert_same(_train(model, steps), reference, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_mask_free_attention_trains_like_the_masked_model(attn, tiny_dir, batches, reference):
    # rows of different lengths: every batch has right padding that only the mask hid
    assert all((b["attention_mask"] == 0).any() for b in batches)
    ref = reference if attn == "sdpa" else _train(_model(tiny_dir, attn_implementation=attn), batches)
    free = [without_padding_mask(b) for b in batches]
    assert all("attention_mask" not in b for b in free)
    _assert_same(_train(_model(tiny_dir, attn_implementation=attn), free), ref)


@pytest.mark.parametrize("mask_free", [True, False])
def test_trainer_passes_the_padding_mask_as_configured(mask_free, tiny_dir, processor, batches, tmp_path):
    from llava_train.config import TrainJobConfig
    from llava_train.train.recipe import build_trainer

    assert ModelConfig(path="tiny").mask_free_attention  # on by default
    model = _model(tiny_dir)
    job = TrainJobConfig(model=ModelConfig(path="tiny", mask_free_attention=mask_free),
                         data=DataConfig(train_path=str(DEMO / "train.json")))
    job.trainer.max_steps = 1
    job.data.group_by_length = job.data.group_by_modality = False
    trainer = build_trainer(job, model, [], processor, tmp_path)
    seen = []
    text_model = model.get_base_model().model.language_model
    hook = text_model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")),
                                                with_kwargs=True)
    try:
        loss = trainer.compute_loss(model, dict(batches[0]))
    finally:
        hook.remove()
    assert len(seen) == 1 and (seen[0] is None) is mask_free
    torch.testing.assert_close(loss, sparse_lm_loss(model, batches[0])[0])  # the same loss either way


def test_speed_keys_are_refused_where_they_cannot_apply():
    problems = speed_problems(ModelConfig(path="tiny", liger=True, loss_chunk_tokens=-1, compile=True,
                                          compile_backend="tvm"),
                              TrainerConfig(checkpoint_every_n_layers=2, activation_offloading=True, tf32=True))
    text = "\n".join(problems)
    assert "compile_backend='tvm'" in text
    assert "liger=true brings its own fused linear cross entropy" in text
    assert "loss_chunk_tokens=-1 must be >= 0" in text
    assert "also set trainer.gradient_checkpointing=true" in text
    if not torch.cuda.is_available():
        assert "model.liger=true needs a CUDA GPU" in text
        assert "activation_offloading=true moves activations from GPU" in text
        assert "trainer.tf32=true needs an Ampere" in text
    assert speed_problems(ModelConfig(path="tiny"), TrainerConfig()) == []


def test_gpu_defaults_follow_the_machine():
    from llava_train.config import DeepSpeedConfig
    from llava_train.data.sampler import pad_multiple
    from llava_train.model.speed import resolve_tf32
    from llava_train.train.distributed import deepspeed_config

    cuda = torch.cuda.is_available()
    assert pad_multiple(DataConfig()) == (8 if cuda else 1)
    assert pad_multiple(DataConfig(pad_to_multiple_of=64)) == 64
    assert deepspeed_config(DeepSpeedConfig(stage=2))["zero_optimization"]["overlap_comm"] is cuda
    assert deepspeed_config(DeepSpeedConfig(stage=2, overlap_comm=True))["zero_optimization"]["overlap_comm"] is True
    offload = deepspeed_config(DeepSpeedConfig(stage=3, offload_optimizer=True, cpu_adam=True))
    assert "zero_force_ds_cpu_optimizer" not in offload  # DeepSpeed's own CPU Adam is accepted
    torch_adam = deepspeed_config(DeepSpeedConfig(stage=3, offload_optimizer=True, cpu_adam=False))
    assert torch_adam["zero_force_ds_cpu_optimizer"] is False
    if not cuda:
        assert resolve_tf32(None) is None and resolve_tf32(False) is None  # leave torch's CPU default


def test_check_train_refuses_speed_keys_before_loading(tiny_dir, tmp_path):
    # config.json only (no weights): liger's text-model check reads the checkpoint's config
    import json
    import shutil

    from llava_train.config import TrainJobConfig
    from llava_train.train.validate import ConfigError, check_train

    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_dir / "config.json", folder / "config.json")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["model_type"] = "gemma"  # no Liger patch for it
    (folder / "config.json").write_text(json.dumps(cfg))
    job = TrainJobConfig(model=ModelConfig(path=str(folder), liger=True, compile=True, compile_backend="xla"),
                         data=DataConfig(train_path=str(DEMO / "train.json")))
    job.trainer.max_steps = 1
    with pytest.raises(ConfigError) as err:
        check_train(job)
    text = str(err.value)
    assert "model.compile_backend='xla'" in text
    assert "Liger has no patch for this checkpoint's text model ('gemma')" in text
    job.model = ModelConfig(path=str(tiny_dir), compile=True, compile_backend="aot_eager", loss_chunk_tokens=256)
    job.trainer.gradient_checkpointing, job.trainer.checkpoint_every_n_layers = True, 2
    check_train(job)  # control: everything that applies on CPU passes


def test_cpu_adam_steps_like_torch_adamw_with_the_same_groups(tiny_dir, processor, batches, tmp_path):
    # deepspeed.cpu_adam: LlavaTrainer builds DeepSpeed's CPU AdamW over the per-module groups (its C++ op
    # is built on first use); one step from the same gradients equals torch's AdamW
    from llava_train.config import DeepSpeedConfig, OptimConfig, TrainJobConfig
    from llava_train.train.recipe import build_trainer

    steps = {}
    for cpu_adam in (False, True):
        model = _model(tiny_dir)
        job = TrainJobConfig(model=ModelConfig(path="tiny"), data=DataConfig(train_path=str(DEMO / "train.json")),
                             optim=OptimConfig(lr=1e-2, projector_lr=3e-3, weight_decay=0.1))
        job.trainer.max_steps = 1
        job.data.group_by_length = job.data.group_by_modality = False
        trainer = build_trainer(job, model, [], processor, tmp_path / str(cpu_adam))
        trainer.deepspeed_cfg = DeepSpeedConfig(stage=2, offload_optimizer=True, cpu_adam=cpu_adam)
        opt = trainer.create_optimizer()
        assert (type(opt).__name__ == "DeepSpeedCPUAdam") is cpu_adam
        assert {g["lr"] for g in opt.param_groups} == {1e-2, 3e-3}  # language / projector groups kept
        loss, _ = sparse_lm_loss(model, batches[0])
        loss.backward()
        opt.step()
        steps[cpu_adam] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for n, p in steps[True].items():
        torch.testing.assert_close(p, steps[False][n], rtol=1e-5, atol=1e-6)
