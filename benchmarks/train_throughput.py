"""Train throughput at 7B proportions: llava-train vs TRL's SFTTrainer, with an ablation per feature.

A CPU benchmark says something about a 7B run only if it keeps the ratios that decide the outcome
(design.md, "7B proportions"). This one builds a random-weight LlavaNext scaled down ~20x in width and
~9x in sequence so a step takes a fraction of a second on 2 cores, keeping:

| ratio | llava-v1.6-mistral-7b | here |
|---|---|---|
| output head share of LM FLOPs, V / (13 L H) | 32000 / (13 x 32 x 4096) = 1.9 % | 192 / (13 x 4 x 192) = 1.9 % |
| image : text : trained tokens per sample | ~2,340 : ~200 : ~100 (LLaVA mix) | measured (JSON `samples`) |
| vision tower | CLIP-L/336, frozen, forward only | 2-layer CLIP, width 64, 112 px / patch 14, 5 pinpoints, frozen |
| fine-tuning | LoRA r=16 on the LM linears, projector trained | the same, both sides |
| GQA, MLP width | 32:8 heads, 3.5 x hidden | 8:2 heads, 3.5 x hidden |

The text is the benchmark mix (benchmarks/mixdata.py) with its turn and word counts scaled to the
image geometry, tokenised by a word-level tokenizer (one token per word, as Mistral's for these common
words) whose 192-id vocabulary keeps the head share. Attention's share is higher than at 7B (sequence /
hidden is ~1.5 here, ~0.6 at 7B), so padding costs a little more here than there.

Both sides train the same checkpoint on the same samples (one epoch of `--samples`), same per-device
batch, fp32 on CPU, same optimizer and learning rate, one after the other in this process, each
configuration `--repeats` times interleaved (so machine load hits every configuration alike); the table
reports medians of wall and CPU time of `trainer.train()` (DataLoader workers' CPU included), of the time
its loop waited for batches (0 DataLoader workers on both sides: TRL's default, and llava-train's auto
count when it trains on the CPU; 1 each in the two `_workers` rows), real (non-pad) tokens / wall second
and the real tokens' share of the batches' token slots.

- TRL (`assistant_only_loss=True`): SFTTrainer on a `messages` + `images` dataset with the checkpoint's
  chat template (its `{% generation %}` marks give TRL the assistant mask), LoRA via `peft_config`,
  gradient checkpointing off: the same objective and the same model compute as llava-train.
- TRL defaults: the same but every other SFTConfig default kept (loss on every token, TRL's default
  gradient checkpointing).
- llava-train defaults, then one row per feature switched off or on: random batches instead of length
  grouping, grouping with every image counted at the assumed size (`data.image_sizes=assumed`) instead of
  its header's, the model's full-vocabulary loss instead of the sparse head, attention with the padding
  mask (`model.mask_free_attention=false`), pixel values by the image processor itself
  (`data.fast_pixels=false`), one thread fetching each batch (`data.fetch_threads=1`), packing, a token
  budget.
- `_workers` rows: one DataLoader worker on each side (`data.num_workers=1`, `dataloader_num_workers=1`:
  llava-train's auto count for a GPU rank with 2 cores; training on the CPU its auto count is 0, since
  torch's compute threads already use every core).

    python benchmarks/train_throughput.py --samples 96 --repeats 5   # the README's table (~5 min on 2 idle cores)
    python benchmarks/train_throughput.py --samples 16 --repeats 1 --only llava_default,trl_assistant_only
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

# the scaled model (see the table above)
TEXT = {"hidden_size": 192, "intermediate_size": 672, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 2, "vocab_size": 192}
VISION = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": 112, "patch_size": 14}
REAL = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 32000}  # llava-v1.6-mistral-7b's text model
# mixdata.KINDS with turns and words scaled ~1/9 like the image tokens: (share, turns, question words, answer words)
SCALED_KINDS = {
    "vqa": (0.40, (1, 2), (2, 4), (1, 1)),
    "conv": (0.25, (1, 2), (2, 4), (4, 16)),
    "detail": (0.07, (1, 1), (2, 3), (10, 24)),
    "ocr": (0.12, (1, 2), (2, 3), (1, 2)),
    "region": (0.10, (1, 2), (2, 4), (1, 3)),
    "text": (0.06, (1, 2), (3, 8), (15, 45)),
}
CONFIGS = ("trl_assistant_only", "trl_defaults", "llava_default", "llava_random_batches", "llava_assumed_image_sizes",
           "llava_full_head", "llava_padding_mask", "llava_processor_pixels", "llava_one_fetch_thread", "llava_packing",
           "llava_token_budget", "trl_assistant_only_workers", "llava_default_workers")


def head_share(text: dict) -> float:
    """Output head FLOPs / language-model linear FLOPs per token (LoRA: weight gradients negligible)."""
    h = text["hidden_size"]
    kv = h * text["num_key_value_heads"] // text["num_attention_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * text["intermediate_size"]
    head = h * text["vocab_size"]
    return head / (head + text["num_hidden_layers"] * layer)


def build_checkpoint(folder: Path) -> None:
    """The scaled random-weight LlavaNext, its word-level tokenizer and processor, saved like a checkpoint."""
    import torch
    from mixdata import WORDS
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        MistralConfig,
        PreTrainedTokenizerFast,
    )

    from llava_train.data.templates import get_family
    from llava_train.model.tiny import _CLIP_MEAN, _CLIP_STD, grid_pinpoints

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *dict.fromkeys(WORDS), ".", "?", ",", "!"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>", "<image>")])
    core.add_tokens([AddedToken(t, special=False) for t in ("[INST]", "[/INST]")])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    assert len(tok) <= TEXT["vocab_size"], len(tok)
    v = VISION
    vision = CLIPVisionConfig(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                              num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
                              image_size=v["image_size"], patch_size=v["patch_size"], projection_dim=v["hidden_size"])
    text = MistralConfig(**TEXT, max_position_embeddings=8192, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    pins = grid_pinpoints(v["image_size"])
    config = LlavaNextConfig(vision_config=vision, text_config=text,
                             image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pins,
                             vision_feature_select_strategy="default", vision_feature_layer=-1,
                             tie_word_embeddings=False)
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).save_pretrained(str(folder))
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": v["image_size"]},
                                    crop_size={"height": v["image_size"], "width": v["image_size"]},
                                    image_grid_pinpoints=pins, image_mean=_CLIP_MEAN, image_std=_CLIP_STD)
    LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=v["patch_size"],
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=get_family("mistral").chat_template).save_pretrained(str(folder))


def make_data(folder: Path, n: int, seed: int) -> Path:
    """`n` LLaVA-mix-shaped samples with turns and words scaled like the image tokens, real JPEGs."""
    import mixdata

    rnd = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rec, size = mixdata.record(rnd, i, image_name=lambda i, s: f"images/{i:06d}.jpg", kinds=SCALED_KINDS)
        if size:
            mixdata.write_jpeg(folder / rec["image"], size, rnd)
        rows.append(rec)
    path = folder / "mix.json"
    path.write_text(json.dumps(rows))
    return path


COUNTS = "_benchmark_counts"  # a key the counting collator adds and the timed loader takes off again


class Counting:
    """Wraps a collator; adds the batch's real (non-pad) and trained token counts to it under `COUNTS`
    (it may run in a DataLoader worker: `_TimedLoader` takes them off in the training process)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items):
        import torch

        batch = self.collate(items)
        if "attention_mask" in batch:
            tokens = int(batch["attention_mask"].sum())
        else:  # packed rows carry no mask: the real tokens are the samples' own
            tokens = sum(len(it["input_ids"]) for it in items if it is not None)
        trained = int((batch["labels"][:, 1:] != -100).sum())  # next-token targets, as both losses score
        batch[COUNTS] = torch.tensor([tokens, trained, batch["input_ids"].numel()])
        return batch


def _lora(peft_cfg):
    from peft import LoraConfig

    return LoraConfig(r=peft_cfg.r, lora_alpha=peft_cfg.alpha, lora_dropout=0.0, target_modules=peft_cfg.target_modules,
                      modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")


class _TimedLoader:
    """The trainer's train DataLoader, timing how long the training loop waits for each batch (reading,
    image processing, tokenising and collating: in this process with 0 workers, else what the workers did
    not hide) and taking the counting collator's counts off each batch."""

    def __init__(self, loader, clock: list, counts: list):
        self._loader, self._clock, self._counts = loader, clock, counts

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __len__(self):
        return len(self._loader)

    def __iter__(self):
        it = iter(self._loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self._clock[0] += time.perf_counter() - t
            for i, n in enumerate(batch.pop(COUNTS).tolist()):
                self._counts[i] += n
            yield batch


def _cpu_seconds() -> float:
    """CPU seconds of this process, its reaped children and its live ones (DataLoader workers)."""
    import psutil

    t = os.times()
    live = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            c = child.cpu_times()
            live += c.user + c.system
        except psutil.Error:
            pass
    return t.user + t.system + t.children_user + t.children_system + live


def _timed(trainer) -> dict:
    """Wall s, CPU s (workers included), data-wait wall s and token counts of `trainer.train()`."""
    trainer.data_collator = Counting(trainer.data_collator)
    clock, counts = [0.0], [0, 0, 0]
    get_loader = trainer.get_train_dataloader
    trainer.get_train_dataloader = lambda: _TimedLoader(get_loader(), clock, counts)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    trainer.train()
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    return {"real_tokens": counts[0], "trained_tokens": counts[1], "padded_tokens": counts[2], "wall_s": wall,
            "cpu_s": cpu, "data_s": clock[0],
            "steps": trainer.state.global_step}


def _teardown() -> float:
    """Collect the finished trainer now (seconds taken): its DataLoader workers (persistent ones stay alive with
    the trainer) are shut down here, outside every timed run, not whenever a later run's garbage collection
    reaches them (which once added ~10 s to the next TRL row). The loader sits in a reference cycle, and the
    cyclic GC closes its index queues before torch's `_shutdown_workers` sends the stop sentinel, so torch waits
    out its join timeouts (pytorch/pytorch#64766: no public close() for a DataLoader; goes when there is one)."""
    import gc

    t = time.perf_counter()
    gc.collect()
    return time.perf_counter() - t


def run_llava(name: str, args, data: Path, ckpt: Path) -> dict:
    import torch
    from transformers import Trainer

    from llava_train.config import DataConfig, ModelConfig, PeftConfig, TrainJobConfig
    from llava_train.model.load import load_processor
    from llava_train.train.recipe import build_datasets, build_model, build_trainer

    job = TrainJobConfig(model=ModelConfig(path=str(ckpt), family="mistral"),
                         data=DataConfig(train_path=str(data), max_length=args.max_length), peft=PeftConfig())
    job.data.group_by_length = job.data.group_by_modality = name != "llava_random_batches"
    if name == "llava_assumed_image_sizes":  # grouping by lengths that count every image at 480x640
        job.data.image_sizes = "assumed"
    job.data.num_workers = 1 if name == "llava_default_workers" else None  # None: the project's auto count
    if name == "llava_packing":  # rows of --pack-length: ~1.7 samples a row, as 4096-token rows hold at 7B
        job.data.packing, job.data.max_length = True, args.pack_length
    if name == "llava_token_budget":
        job.data.max_tokens_per_batch = args.token_budget
    job.model.mask_free_attention = name != "llava_padding_mask"
    job.data.fast_pixels = name != "llava_processor_pixels"
    if name == "llava_one_fetch_thread":
        job.data.fetch_threads = 1
    t = job.trainer
    t.num_train_epochs, t.per_device_train_batch_size, t.logging_steps = 1, args.batch_size, 10**6
    t.save_steps, t.disable_tqdm, t.report_to = 10**6, True, "none"
    job.optim.lr, job.optim.warmup_ratio, job.optim.scheduler = args.lr, 0.0, "constant"
    job.eval.enabled = False
    processor = load_processor(str(ckpt))
    train_ds, _ = build_datasets(job.data, job.model, processor)
    torch.manual_seed(0)
    model = build_model(job.model, job.peft, str(ckpt), seed=0)
    out = Path(tempfile.mkdtemp(prefix="llava-tp-"))
    trainer = build_trainer(job, model, train_ds, processor, out)
    if name == "llava_full_head":  # the model's own loss: every position projected onto the vocabulary
        trainer.compute_loss = functools.partial(Trainer.compute_loss, trainer)
        trainer.compute_loss_func = None  # (the trained-token loss expects the sparse head's logits)
    r = _timed(trainer) | {"dataloader_workers": trainer.args.dataloader_num_workers}
    del trainer, model
    shutil.rmtree(out, ignore_errors=True)
    return r | {"teardown_s": _teardown()}


def trl_dataset(rows, folder: Path):
    from datasets import Dataset, Image, Sequence

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
    return Dataset.from_dict({"messages": msgs, "images": images}).cast_column("images", Sequence(Image()))


def run_trl(name: str, args, rows, folder: Path, ckpt: Path) -> dict:
    import torch
    from transformers import LlavaNextForConditionalGeneration
    from trl import SFTConfig, SFTTrainer

    from llava_train.config import PeftConfig
    from llava_train.model.load import load_processor

    processor = load_processor(str(ckpt))
    ds = trl_dataset(rows, folder)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration.from_pretrained(str(ckpt))
    same = name.startswith("trl_assistant_only")
    extra = {"assistant_only_loss": True, "gradient_checkpointing": False} if same else {}
    if name == "trl_assistant_only_workers":  # one worker, as llava_default_workers
        extra["dataloader_num_workers"] = 1
    sft = SFTConfig(output_dir=tempfile.mkdtemp(prefix="trl-tp-"), num_train_epochs=1,
                    per_device_train_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="constant",
                    warmup_steps=0, logging_steps=10**6, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                    max_length=args.max_length, bf16=False, use_cpu=not torch.cuda.is_available(), **extra)
    trainer = SFTTrainer(model=model, args=sft, train_dataset=ds, processing_class=processor,
                         peft_config=_lora(PeftConfig()))
    collator = type(trainer.data_collator).__name__
    r = _timed(trainer)
    del trainer, model
    shutil.rmtree(sft.output_dir, ignore_errors=True)
    return r | {"gradient_checkpointing": sft.gradient_checkpointing, "assistant_only_loss": sft.assistant_only_loss,
                "collator": collator, "dataloader_workers": sft.dataloader_num_workers, "teardown_s": _teardown()}


def sample_stats(data: Path, ckpt: Path, max_length: int) -> dict:
    """Per-sample image / text / trained tokens as llava-train encodes them."""
    from llava_train.config import DataConfig, ModelConfig
    from llava_train.model.load import load_processor
    from llava_train.train.recipe import build_datasets

    processor = load_processor(str(ckpt))
    ds, _ = build_datasets(DataConfig(train_path=str(data), max_length=max_length), ModelConfig(path=str(ckpt)),
                           processor)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    image = text = trained = 0
    for i in range(len(ds)):
        item = ds[i]
        ids = item["input_ids"]
        n_image = int((ids == image_id).sum())
        image, text = image + n_image, text + len(ids) - n_image
        trained += int((item["labels"] != -100).sum())
    n = len(ds)
    return {"image_tokens_per_sample": round(image / n, 1), "text_tokens_per_sample": round(text / n, 1),
            "trained_tokens_per_sample": round(trained / n, 1),
            "ratio_image_text_trained": f"{image / trained:.1f} : {text / trained:.1f} : 1",
            "ratio_at_7b": f"{2340 / 100:.1f} : {200 / 100:.1f} : 1"}


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"], "traceback": runs[0].get("traceback", "")}
    med = {k: statistics.median(r[k] for r in ok) for k in ("wall_s", "cpu_s", "data_s")}
    first = ok[0]
    out = {k: v for k, v in first.items() if k not in ("wall_s", "cpu_s", "data_s")}
    out.update({"repeats": len(ok), "median_wall_s": round(med["wall_s"], 2), "median_cpu_s": round(med["cpu_s"], 2),
                "median_data_wait_s": round(med["data_s"], 2),
                "median_model_s": round(statistics.median(r["wall_s"] - r["data_s"] for r in ok), 2),
                "wall_s_each": [round(r["wall_s"], 2) for r in ok], "cpu_s_each": [round(r["cpu_s"], 2) for r in ok],
                "real_share": round(first["real_tokens"] / max(first["padded_tokens"], 1), 4),
                "real_tokens_per_wall_s": round(first["real_tokens"] / med["wall_s"], 1),
                "real_tokens_per_cpu_s": round(first["real_tokens"] / med["cpu_s"], 1)})
    return out


def write_result(out: str, settings: dict, runs: dict[str, list[dict]]) -> dict:
    settings["loadavg_end"] = os.getloadavg()
    result = {"settings": settings, "results": {c: summarise(r) for c, r in runs.items() if r},
              "loadavg_per_run": {c: [r["loadavg"] for r in rs] for c, rs in runs.items()}}
    base = result["results"].get("llava_default", {})
    for r in result["results"].values():
        for unit in ("wall", "cpu"):
            key = f"real_tokens_per_{unit}_s"
            if key in base and key in r:
                r[f"llava_default_speedup_{unit}"] = round(base[key] / r[key], 2)
    add_paired(result)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def add_paired(result: dict) -> None:
    """TRL (assistant-only) time / this configuration's time, per round (runs minutes apart share the
    machine's load), and the median over rounds: steadier than a ratio of medians on a loaded machine."""
    ref = result["results"].get("trl_assistant_only", {})
    for r in result["results"].values():
        for unit in ("wall", "cpu"):
            a, b = ref.get(f"{unit}_s_each"), r.get(f"{unit}_s_each")
            if a and b:
                ratios = [x / y for x, y in zip(a, b)]
                r[f"paired_speedup_vs_trl_assistant_only_{unit}"] = {
                    "per_round": [round(x, 2) for x in ratios], "median": round(statistics.median(ratios), 2)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=48, help="one epoch of this many samples per run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--token-budget", type=int, default=2560,
                   help="data.max_tokens_per_batch of that ablation row (~ batch x mean sample length)")
    p.add_argument("--pack-length", type=int, default=512, help="data.max_length (row length) of the packing row")
    p.add_argument("--only", default="", help="comma-separated subset of " + ",".join(CONFIGS))
    p.add_argument("--out", default=str(HERE / "results" / "train_throughput.json"))
    args = p.parse_args()

    import torch

    configs = [c for c in CONFIGS if not args.only or c in args.only.split(",")]
    work = Path(tempfile.mkdtemp(prefix="llava-throughput-"))
    ckpt = work / "ckpt"
    build_checkpoint(ckpt)
    data = make_data(work, args.samples, seed=1)
    rows = json.loads(data.read_text())
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    settings = {
        "model": {"text": TEXT, "vision": VISION, "random_weights": True},
        "head_share_of_lm_flops": {"here": round(head_share(TEXT), 4), "mistral_7b": round(head_share(REAL), 4)},
        "samples": sample_stats(data, ckpt, args.max_length) | {"count": len(rows)},
        "per_device_batch_size": args.batch_size, "epochs": 1, "lr": args.lr, "max_length": args.max_length,
        "precision": "fp32", "fine_tuning": "LoRA r=16 alpha=32 on the LM linears, projector trained, tower frozen",
        "device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(), "cpu_model": _cpu_model(), "repeats": args.repeats, "trl_version": trl_version,
        "token_budget_row": args.token_budget, "packing_row_length": args.pack_length,
        "dataloader_workers": "TRL's default (0) and llava-train's auto count (0 on the CPU here), except the "
                              "*_workers rows: 1 on both sides",
        "loadavg_start": os.getloadavg(),
    }
    print(json.dumps(settings["samples"]), flush=True)
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for rep in range(args.repeats):
        for name in configs:
            try:
                if name.startswith("trl"):
                    if trl_version is None:
                        raise ImportError("trl is not installed (pip install 'llava-train[bench]')")
                    r = run_trl(name, args, rows, work, ckpt)
                else:
                    r = run_llava(name, args, data, ckpt)
            except Exception as exc:  # report exactly why a configuration could not run
                r = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            r["loadavg"] = os.getloadavg()[0]
            runs[name].append(r)
            print(f"[{rep + 1}/{args.repeats}] {name}: " + (r.get("error") or
                  f"{r['real_tokens']} tokens, {r['trained_tokens']} trained, {r['wall_s']:.1f} s wall, "
                  f"{r['cpu_s']:.1f} s cpu, {r['data_s']:.1f} s waiting for batches"), flush=True)
        write_result(args.out, settings, runs)  # after every round: a stopped run keeps its rounds
    result = write_result(args.out, settings, runs)
    print("\n| configuration | real tokens | real share | trained tokens | median wall s | median CPU s "
          "| median data wait s | median wall s - data wait | real tokens / wall s "
          "| llava-train default is x faster (wall / CPU) |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, r in result["results"].items():
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:150]} | | | | | | | | |")
        else:
            print(f"| {name} | {r['real_tokens']} | {r['real_share']:.1%} | {r['trained_tokens']} | "
                  f"{r['median_wall_s']} | "
                  f"{r['median_cpu_s']} | {r['median_data_wait_s']} | {r['median_model_s']} | "
                  f"{r['real_tokens_per_wall_s']} | {r.get('llava_default_speedup_wall')} / "
                  f"{r.get('llava_default_speedup_cpu')} |")
    print("settings: " + json.dumps({k: v for k, v in settings.items() if k != "model"}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
