"""Each fine-tuning method trains a few steps on the tiny model; exactly the intended parameters change and
every other one stays bit-identical. Saved LoRA/QLoRA adapters reload with plain peft and reproduce
the trained model's logits (image_newline included)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from conftest import DEMO
from llava_train.config import DataConfig, ModelConfig, PeftConfig, TrainJobConfig
from llava_train.constants import LABELS
from llava_train.data.collate import Collator
from llava_train.train.recipe import build_datasets, build_model, build_trainer

TINY_SAVED = ["lm_head", "embed_tokens"]  # what configs/model/tiny.yaml trains fully (random base)


def _small_train_file() -> Path:
    """The first 16 demo samples (a few steps of batch 4 need no more; indexing 2,000 takes time)."""
    import json
    import tempfile

    path = Path(tempfile.gettempdir()) / f"llava-train-test-{os.getpid()}" / "train16.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json.loads((DEMO / "train.json").read_text())[:16]))
    return path


def _job(out: Path, modules_to_save=(), gradient_checkpointing=False, model_kw=None, **peft) -> TrainJobConfig:
    job = TrainJobConfig(
        model=ModelConfig(path="tiny", modules_to_save=list(modules_to_save), **(model_kw or {})),
        data=DataConfig(train_path=str(_small_train_file()), image_root=str(DEMO), max_length=512),
        peft=PeftConfig(**peft),
    )
    job.trainer.max_steps = 3
    job.trainer.per_device_train_batch_size = 4
    job.trainer.disable_tqdm = True
    job.trainer.save_steps = 3
    job.trainer.gradient_checkpointing = gradient_checkpointing
    job.optim.lr = 1e-2
    job.output_dir = str(out)
    return job


class Run:
    def __init__(self, job, processor, tiny_dir):
        self.job = job
        self.train_ds, _ = build_datasets(job.data, job.model, processor)
        torch.manual_seed(job.seed)  # same LoRA initialisation in every run of a configuration
        self.model = build_model(job.model, job.peft, str(tiny_dir),
                                 gradient_checkpointing=job.trainer.gradient_checkpointing)
        self.before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.trainer = build_trainer(job, self.model, self.train_ds, processor, Path(job.output_dir))
        self.trainer.train()
        self.params = dict(self.model.named_parameters())
        self.changed = {n for n, p in self.params.items() if not torch.equal(p.detach(), self.before[n])}
        self.unchanged = set(self.params) - self.changed
        self.trainable = {n for n, p in self.params.items() if p.requires_grad}
        self.batch = Collator(pad_token_id=processor.tokenizer.pad_token_id)([self.train_ds[i] for i in range(3)])
        self.batch.pop(LABELS)

    def logits(self, model=None):
        model = (model or self.model).eval()
        with torch.no_grad():
            return model(**self.batch).logits


def _trained(processor, tiny_dir, tmp_path_factory, name, **kw) -> Run:
    return Run(_job(tmp_path_factory.mktemp(name), **kw), processor, tiny_dir)


@pytest.fixture(scope="module")
def lora(processor, tiny_dir, tmp_path_factory):
    return _trained(processor, tiny_dir, tmp_path_factory, "lora")


@pytest.fixture(scope="module")
def qlora(processor, tiny_dir, tmp_path_factory):
    return _trained(processor, tiny_dir, tmp_path_factory, "qlora", method="qlora", modules_to_save=TINY_SAVED)


def _saved_copies(names) -> set[str]:
    """Module kinds trained through peft's modules_to_save copies."""
    return {n.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for n in names if ".modules_to_save." in n}


def _assert_adapter_only(run: Run, saved: set[str]):
    assert run.changed == run.trainable  # every trainable parameter moved, and nothing else
    lora = {n for n in run.changed if "lora_" in n}
    assert lora and all(".language_model.layers." in n for n in lora)
    assert _saved_copies(run.changed) == saved
    assert run.changed == lora | {n for n in run.changed if ".modules_to_save." in n} | {
        "base_model.model.model.image_newline"}
    # the vision tower, the original copies of fully trained modules, norms, ... are bit-identical
    assert any("vision_tower" in n for n in run.unchanged) and not any("vision_tower" in n for n in run.changed)
    assert any("multi_modal_projector.original_module" in n for n in run.unchanged)
    assert any("base_layer" in n for n in run.unchanged)


def test_lora_trains_only_adapter_projector_and_image_newline(lora):
    _assert_adapter_only(lora, {"multi_modal_projector"})
    targets = {n.split(".lora_")[0] for n in lora.changed if "lora_" in n}
    # all 7 linears of both language-model layers, by full-name regex
    assert len(targets) == 2 * 7
    assert all(re.search(r"language_model\.layers\.\d\.(self_attn|mlp)\.", t) for t in targets)


def test_lora_with_projector_and_image_newline_frozen(processor, tiny_dir, tmp_path):
    run = Run(_job(tmp_path, train_projector=False, train_image_newline=False), processor, tiny_dir)
    assert run.changed == run.trainable and run.changed and all("lora_" in n for n in run.changed)


def test_qlora_trains_adapter_on_4bit_language_model(qlora):
    import bitsandbytes as bnb

    _assert_adapter_only(qlora, {"multi_modal_projector", *TINY_SAVED})
    modules = dict(qlora.model.named_modules())
    lm_linears = [n for n in modules if re.fullmatch(r".*language_model\.layers\.\d\.\w+\.\w+_proj\.base_layer", n)]
    assert len(lm_linears) == 14 and all(isinstance(modules[n], bnb.nn.Linear4bit) for n in lm_linears)
    assert modules[lm_linears[0]].weight.quant_state.quant_type == "nf4"
    # vision tower and projector stay nn.Linear in full precision
    for n, m in modules.items():
        if ("vision_tower" in n or "multi_modal_projector" in n) and isinstance(m, torch.nn.Linear):
            assert not isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) and m.weight.dtype == torch.float32, n
    # the packed 4-bit weights are bit-identical after training
    packed = [n for n, p in qlora.params.items() if p.dtype == torch.uint8]
    assert len(packed) == 14 and set(packed) <= qlora.unchanged


def test_qlora_8bit_variant_trains(processor, tiny_dir, tmp_path):
    import bitsandbytes as bnb

    run = Run(_job(tmp_path, method="qlora", bits=8), processor, tiny_dir)
    assert run.changed == run.trainable and any("lora_" in n for n in run.changed)
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in run.model.modules()) == 14
    assert {n for n, p in run.params.items() if p.dtype == torch.int8} <= run.unchanged


def test_full_trains_language_model_and_projector_not_vision(processor, tiny_dir, tmp_path):
    run = Run(_job(tmp_path, method="full"), processor, tiny_dir)
    vision = {n for n in run.params if n.startswith("model.vision_tower")}
    assert vision and vision <= run.unchanged
    assert run.changed == set(run.params) - vision  # language model incl. embeddings/lm_head, projector, newline
    assert any("multi_modal_projector" in n for n in run.changed) and "model.image_newline" in run.changed


def test_vision_lora_opt_in_with_dora_and_rslora(processor, tiny_dir, tmp_path):
    run = Run(_job(tmp_path, train_vision_tower=True, use_dora=True, use_rslora=True), processor, tiny_dir)
    assert run.changed == run.trainable
    vision_lora = {n for n in run.changed if "vision_tower" in n}
    assert vision_lora and all("lora_" in n for n in vision_lora)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in vision_lora} == {"q_proj", "k_proj", "v_proj",
                                                                             "out_proj", "fc1", "fc2"}
    assert any("lora_magnitude_vector" in n for n in vision_lora)  # DoRA
    # the vision tower's own weights stay bit-identical
    assert {n for n in run.params if "vision_tower" in n and "lora_" not in n} <= run.unchanged
    layer = run.model.get_submodule("base_model.model.model.language_model.layers.0.self_attn.q_proj")
    assert layer.scaling["default"] == pytest.approx(32 / 16 ** 0.5)  # rsLoRA: alpha / sqrt(r)


@pytest.mark.parametrize("method,reentrant", [("lora", False), ("lora", True), ("qlora", True)])
def test_gradient_checkpointing_trains_like_without(method, reentrant, lora, qlora, processor, tiny_dir, tmp_path):
    ref = lora if method == "lora" else qlora
    kw = {"modules_to_save": TINY_SAVED} if method == "qlora" else {}
    run = Run(_job(tmp_path, method=method, gradient_checkpointing=True, model_kw={"checkpoint_reentrant": reentrant},
                   **kw), processor, tiny_dir)
    assert run.model.is_activation_checkpointing
    assert run.changed == ref.changed
    for n in ref.changed:  # recomputation gives the same gradients: the same trained weights
        torch.testing.assert_close(run.params[n], ref.params[n], rtol=1e-4, atol=1e-5)


def test_reentrant_checkpointing_without_input_grads_cannot_train(processor, tiny_dir, tmp_path):
    # Why validation refuses this combination: with frozen embeddings (and a frozen projector) nothing that
    # enters a reentrant-checkpointed layer requires grad, so no gradient reaches its LoRA weights.
    job = _job(tmp_path, gradient_checkpointing=True, train_projector=False, train_image_newline=False,
               model_kw={"checkpoint_reentrant": True, "input_require_grads": False})
    with pytest.raises(RuntimeError, match="does not require grad"):
        Run(job, processor, tiny_dir)


def _adapter_keys(folder: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return set(f.keys())


def _reload(run: Run, folder: Path, base):
    from peft import PeftModel

    run.trainer.save_model(str(folder))
    assert "base_model.model.model.image_newline" in _adapter_keys(folder)
    reloaded = PeftModel.from_pretrained(base, str(folder))
    newline = "base_model.model.model.image_newline"
    assert torch.equal(dict(reloaded.named_parameters())[newline], run.params[newline])
    assert not torch.equal(run.params[newline], run.before[newline])
    return reloaded


def test_lora_adapter_reloads_with_plain_peft(lora, tiny_dir, tmp_path):
    from transformers import LlavaNextForConditionalGeneration

    base = LlavaNextForConditionalGeneration.from_pretrained(str(tiny_dir))
    untuned = lora.logits(base)
    reloaded = _reload(lora, tmp_path / "adapter", base)
    expected = lora.logits()
    assert not torch.allclose(untuned, expected)
    torch.testing.assert_close(lora.logits(reloaded), expected, rtol=0, atol=1e-5)
    # intermediate checkpoints carry image_newline too (Trainer.save_model is the one path)
    assert "base_model.model.model.image_newline" in _adapter_keys(Path(lora.job.output_dir) / "checkpoint-3")


def test_qlora_adapter_reloads_with_plain_peft(qlora, tiny_dir, tmp_path):
    from transformers import BitsAndBytesConfig, LlavaNextForConditionalGeneration

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32,
                               llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"])
    base = LlavaNextForConditionalGeneration.from_pretrained(str(tiny_dir), quantization_config=quant)
    reloaded = _reload(qlora, tmp_path / "adapter", base)
    torch.testing.assert_close(qlora.logits(reloaded), qlora.logits(), rtol=0, atol=1e-5)


def _groups(optimizer) -> dict[str, dict]:
    return {g["name"]: g for g in optimizer.param_groups}


def test_per_module_learning_rates_in_optimizer_param_groups(processor, tiny_dir, tmp_path):
    job = _job(tmp_path, train_vision_tower=True)  # LoRA on language model and vision tower, projector fully
    job.trainer.max_steps = 2
    job.optim.lr, job.optim.projector_lr, job.optim.vision_lr = 1e-3, 1e-2, 1e-5
    job.optim.weight_decay = 0.1
    job.optim.warmup_ratio, job.optim.scheduler = 0.0, "constant"
    run = Run(job, processor, tiny_dir)
    groups = _groups(run.trainer.optimizer)
    names = {id(p): n for n, p in run.model.named_parameters()}
    members = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    # language first: it is the learning rate HF Trainer logs
    assert list(groups) == ["language", "projector", "projector_no_decay", "vision"]
    # after training under the scheduler, each group still runs at its own rate
    assert [groups[k]["lr"] for k in ("language", "vision", "projector", "projector_no_decay")] == [
        1e-3, 1e-5, 1e-2, 1e-2]
    assert groups["projector"]["weight_decay"] == 0.1 and groups["projector_no_decay"]["weight_decay"] == 0.0
    assert all("lora_" in n and "vision_tower" not in n for n in members["language"])
    assert all("lora_" in n and "vision_tower" in n for n in members["vision"])
    assert all("multi_modal_projector" in n and n.endswith("weight") for n in members["projector"])
    assert members["projector_no_decay"] == {n for n in run.trainable if n.endswith("bias")} | {
        "base_model.model.model.image_newline"}
    assert set().union(*members.values()) == run.trainable  # every trainable parameter in exactly one group
    assert sum(len(m) for m in members.values()) == len(run.trainable)


def test_full_fine_tuning_groups_without_vision_and_no_decay_for_norms(processor, tiny_dir, tmp_path):
    from llava_train.model.param_groups import param_groups

    job = _job(tmp_path, method="full")
    job.optim.weight_decay, job.optim.projector_lr = 0.05, 5e-3
    model = build_model(job.model, job.peft, str(tiny_dir))
    groups = {g["name"]: g for g in param_groups(model, job.optim)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert set(groups) == {"language", "language_no_decay", "projector", "projector_no_decay"}
    no_decay = {names[id(p)] for p in groups["language_no_decay"]["params"]}
    assert no_decay and all("norm" in n for n in no_decay) and groups["language_no_decay"]["weight_decay"] == 0.0
    assert groups["projector"]["lr"] == 5e-3 and groups["language"]["lr"] == job.optim.lr
