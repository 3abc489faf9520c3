"""Model cards for exported adapters and merged models (`huggingface_hub.ModelCard`, YAML metadata +
markdown): base model, datasets, library, pipeline tag, hyperparameters, eval metrics, usage."""

from __future__ import annotations

from enum import Enum
from typing import Any

from llava_train.config.schema import TrainJobConfig

PIPELINE_TAG = "image-text-to-text"


def _hyperparameters(train_cfg: TrainJobConfig) -> dict[str, Any]:
    peft, optim, trainer, model = train_cfg.peft, train_cfg.optim, train_cfg.trainer, train_cfg.model
    out = {"method": peft.method, "base dtype": model.dtype, "prompt family": model.family,
           "learning rate": optim.lr, "projector learning rate": optim.projector_lr,
           "scheduler": optim.scheduler, "optimizer": trainer.optim, "max steps": trainer.max_steps,
           "epochs": trainer.num_train_epochs,
           "batch size per device": trainer.per_device_train_batch_size,
           "gradient accumulation": trainer.gradient_accumulation_steps, "seed": train_cfg.seed}
    if peft.method == "qlora":
        out.update({"quantisation": f"{peft.bits}-bit" + (f" {peft.quant_type}" if peft.bits == 4 else "")})
    if peft.method in ("lora", "qlora"):
        out.update({"LoRA r": peft.r, "LoRA alpha": peft.alpha, "LoRA dropout": peft.dropout,
                    "LoRA targets": peft.target_modules,
                    "modules trained fully": list(model.modules_to_save)
                    + (["multi_modal_projector"] if peft.train_projector else [])})
    return {k: str(v) if isinstance(v, Enum) else v for k, v in out.items() if v not in (None, "", [])}


def build_card(*, kind: str, repo_id: str, base_model: str, datasets: list[str], train_cfg: TrainJobConfig,
               metrics: dict[str, Any], license: str = "", tags: list[str] = ()):
    """A `ModelCard` for `kind` = "adapter" (library_name peft) or "merged" (library_name transformers)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    name = repo_id.split("/")[-1] if repo_id else "llava-train-model"
    eval_results = []
    data_path = train_cfg.data.eval_path or "eval split"
    for key, metric in (("eval_accuracy", "exact_match"), ("eval_contains_accuracy", "contains_match")):
        if isinstance(metrics.get(key), (int, float)):
            eval_results.append(EvalResult(task_type=PIPELINE_TAG, dataset_type=(datasets or ["custom"])[0],
                                           dataset_name=str(data_path).split("/")[-1], metric_type=metric,
                                           metric_value=float(metrics[key])))
    data = ModelCardData(
        base_model=base_model or None,
        datasets=list(datasets) or None,
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag=PIPELINE_TAG,
        license=license or None,
        tags=["llava-next", "llava-train", "vision-language"] + (["lora"] if kind == "adapter" else []) + list(tags),
        model_name=name,
        eval_results=eval_results or None,
    )
    hp = _hyperparameters(train_cfg)
    lines = [f"# {name}", "",
             f"LLaVA-NeXT fine-tuned with llava-train from `{base_model}`"
             + (" (LoRA adapter)." if kind == "adapter" else " (adapter merged into the weights)."), ""]
    if datasets:
        lines += ["Training data: " + ", ".join(f"`{d}`" for d in datasets), ""]
    family = train_cfg.model.family
    if family:
        lines += [f"Prompt format: the `{family}` family as trained; the processor's chat template in this folder "
                  "renders it exactly, and `generation_config.json` stops on its end-of-turn token.", ""]
    lines += ["## Training hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in hp.items()]
    shown = {k: v for k, v in metrics.items() if k.startswith(("eval_", "train_loss")) and isinstance(v, (int, float))}
    if shown:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in shown.items()]
    lines += ["", "## Usage", "", "```python", *usage(kind, repo_id or "<this folder>", base_model), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def usage(kind: str, repo: str, base_model: str) -> list[str]:
    ask = ('messages = [{"role": "user", "content": [{"type": "image", "url": "photo.png"},\n'
           '                                         {"type": "text", "text": "What is in the image?"}]}]')
    generate = ["inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,",
                "                                       return_dict=True, return_tensors=\"pt\")",
                "out = model.generate(**inputs, max_new_tokens=64)  # stops on the end-of-turn token",
                "print(processor.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))"]
    if kind == "merged":
        return ["from transformers import pipeline", "",
                f'pipe = pipeline("{PIPELINE_TAG}", model="{repo}")', ask,
                "print(pipe(text=messages, max_new_tokens=64, return_full_text=False)[0][\"generated_text\"])", "",
                "# or by hand: the processor's chat template is the prompt format the model was trained with",
                "from transformers import AutoProcessor, LlavaNextForConditionalGeneration", "",
                f'model = LlavaNextForConditionalGeneration.from_pretrained("{repo}")',
                f'processor = AutoProcessor.from_pretrained("{repo}")', *generate]
    return ["from peft import PeftModel",
            "from transformers import AutoProcessor, LlavaNextForConditionalGeneration", "",
            f'base = LlavaNextForConditionalGeneration.from_pretrained("{base_model}")',
            f'model = PeftModel.from_pretrained(base, "{repo}")',
            f'processor = AutoProcessor.from_pretrained("{repo}")', ask, *generate]
