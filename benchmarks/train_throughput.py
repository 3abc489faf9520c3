"""Train throughput: llava-train vs TRL's SFTTrainer on the same tiny LLaVA-NeXT, data, batch size and steps.

Both train the same freshly loaded tiny checkpoint (full fine-tuning, fp32, CPU unless CUDA is
present) on the same generated LLaVA-mix-shaped samples with real JPEG files, for the same number of
optimizer steps at the same per-device batch size and learning rate, one after the other in this
process. The measure is real (non-pad) tokens through forward+backward per second of `trainer.train()`.

- TRL: `SFTTrainer` with a `messages` + `images` dataset, so it picks its own
  `DataCollatorForVisionLanguageModeling` (the processor's chat template, the processor's padding and
  image processing in the collator, the model's full-vocabulary loss). Gradient checkpointing (TRL's
  default) is switched off so both run the same model compute.
- llava-train: `LlavaTrainer` with our dataset (pixels decoded lazily), length+modality grouped batches
  (or packing / token budget with flags), dynamic patch padding and the sparse loss.

    python benchmarks/train_throughput.py                      # 20 steps, batch 8
    python benchmarks/train_throughput.py --steps 100 --packing
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


class Counting:
    """Wraps a collator and counts the non-pad tokens of the batches it makes (behaviour unchanged)."""

    def __init__(self, collate, pad_id):
        self.collate, self.pad_id, self.tokens = collate, pad_id, 0

    def __call__(self, items):
        batch = self.collate(items)
        if "attention_mask" in batch:
            self.tokens += int(batch["attention_mask"].sum())
        else:  # packed rows carry no mask: the real tokens are the samples' own
            self.tokens += sum(len(it["input_ids"]) for it in items if it is not None)
        return batch


def common_args(out: str, args, **extra):
    return dict(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, logging_steps=10**6,
                save_strategy="no", report_to=[], disable_tqdm=True, seed=0, dataloader_num_workers=args.workers,
                remove_unused_columns=False, **extra)


def run_llava(args, path, tiny_dir):
    import torch
    from transformers import LlavaNextForConditionalGeneration, TrainingArguments

    from llava_train.config import DataConfig, OptimConfig
    from llava_train.data.dataset import ConversationDataset, Encoder
    from llava_train.data.images import ImageGeometry
    from llava_train.data.sampler import batching
    from llava_train.data.templates import get_family
    from llava_train.model.load import load_processor
    from llava_train.train.trainer import LlavaTrainer

    proc = load_processor(str(tiny_dir))
    cfg = DataConfig(train_path=str(path), max_length=args.max_length, packing=args.packing,
                     max_tokens_per_batch=args.max_tokens or None)
    enc = Encoder(proc.tokenizer, get_family("mistral"), ImageGeometry.from_processor(proc), max_length=args.max_length)
    ds = ConversationDataset(str(path), cfg, enc, proc.image_processor)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration.from_pretrained(str(tiny_dir))
    targs = TrainingArguments(**common_args(tempfile.mkdtemp(), args))
    collate, sampler = batching(cfg, ds, proc.tokenizer.pad_token_id, batch_size=args.batch_size,
                                world_size=targs.world_size, seed=0)
    counting = Counting(collate, proc.tokenizer.pad_token_id)
    trainer = LlavaTrainer(model=model, args=targs, train_dataset=ds, data_collator=counting,
                           optim_cfg=OptimConfig(lr=args.lr), train_batch_sampler=sampler)
    t = time.time()
    trainer.train()
    return counting.tokens, time.time() - t


def run_trl(args, rows, folder, tiny_dir):
    import torch
    from datasets import Dataset, Image, Sequence
    from transformers import LlavaNextForConditionalGeneration
    from trl import SFTConfig, SFTTrainer

    from llava_train.model.load import load_processor

    proc = load_processor(str(tiny_dir))
    msgs, images = [], []
    for r in rows:  # TRL's documented VLM format: messages with {"type": "image"} parts + an images column
        conv = []
        for t in r["conversations"]:
            role = "user" if t["from"] == "human" else "assistant"
            text = t["value"]
            if "<image>" in text:
                conv.append({"role": role, "content": [{"type": "image"},
                                                       {"type": "text", "text": text.replace("<image>\n", "")}]})
            else:
                conv.append({"role": role, "content": [{"type": "text", "text": text}]})
        msgs.append(conv)
        images.append([str(folder / r["image"])] if "image" in r else [])
    ds = Dataset.from_dict({"messages": msgs, "images": images}).cast_column("images", Sequence(Image()))
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration.from_pretrained(str(tiny_dir))
    sft = SFTConfig(**common_args(tempfile.mkdtemp(), args, max_length=args.max_length, gradient_checkpointing=False,
                                  bf16=False, use_cpu=not torch.cuda.is_available()))
    trainer = SFTTrainer(model=model, args=sft, train_dataset=ds, processing_class=proc)
    counting = Counting(trainer.data_collator, proc.tokenizer.pad_token_id)
    trainer.data_collator = counting
    collator_name = type(counting.collate).__name__
    t = time.time()
    trainer.train()
    return counting.tokens, time.time() - t, collator_name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "train_throughput.json"))
    args = p.parse_args()

    import torch
    from mixdata import make_set

    from llava_train.config import TinyModelConfig
    from llava_train.model.tiny import ensure_tiny_checkpoint

    tiny_dir = ensure_tiny_checkpoint(TinyModelConfig())
    work = Path(tempfile.mkdtemp(prefix="llava-throughput-"))
    path = make_set(work, args.steps * args.batch_size, seed=1)  # one epoch = exactly the steps
    rows = json.loads(path.read_text())
    settings = {"model": "tiny LlavaNext (embedded default, 28-px geometry, Mistral tokenizer)", "steps": args.steps,
                "per_device_batch_size": args.batch_size, "samples": len(rows), "lr": args.lr,
                "max_length": args.max_length, "dataloader_workers": args.workers, "fine_tuning": "full, fp32",
                "device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads(),
                "cpu_cores": os.cpu_count(), "llava_train_batching": "packing" if args.packing else
                ("token budget" if args.max_tokens else "length+modality grouped"),
                "trl_gradient_checkpointing": False}
    result = {"settings": settings}
    tok, sec = run_llava(args, path, tiny_dir)
    result["llava_train"] = {"real_tokens": tok, "seconds": round(sec, 1), "real_tokens_per_s": round(tok / sec, 1)}
    print(f"llava-train: {tok} real tokens in {sec:.1f} s", flush=True)
    try:
        import trl

        settings["trl_version"] = trl.__version__
        tok_t, sec_t, collator = run_trl(args, rows, work, tiny_dir)
        settings["trl_collator"] = collator
        result["trl"] = {"real_tokens": tok_t, "seconds": round(sec_t, 1), "real_tokens_per_s": round(tok_t / sec_t, 1)}
        result["ratio"] = round(result["llava_train"]["real_tokens_per_s"] / result["trl"]["real_tokens_per_s"], 2)
    except Exception as exc:  # report exactly why TRL could not run, and what was measured
        result["trl"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        result["ratio"] = None
    print("\n| trainer | real tokens | seconds | real tokens/s |\n|---|---|---|---|")
    for name in ("trl", "llava_train"):
        r = result[name]
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:200]} | | |")
        else:
            print(f"| {name} | {r['real_tokens']} | {r['seconds']} | {r['real_tokens_per_s']} |")
    print(f"\nratio llava-train / TRL: {result['ratio']}  (target >= 1.5)")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
