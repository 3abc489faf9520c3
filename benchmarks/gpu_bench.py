"""GPU training benchmark at the real llava-v1.6-mistral-7b shapes (driven by benchmarks/gpu.sh).

Random weights at the real geometry (CLIP-L/336 tower, Mistral-7B language model, 32k vocabulary, the
5 anyres pinpoints), built on the GPU in bf16: nothing is downloaded. The data is the benchmark
LLaVA-mix (benchmarks/mixdata.py: real JPEGs at COCO/VG sizes, ~2,340 image tokens per image sample)
encoded by llava-train's own pipeline with the Mistral-7B tokenizer. Each configuration runs in its own
process (compile caches, Liger's module patches and CUDA memory never leak between rows): LoRA r=16,
bf16, `--warmup` steps, then `--steps` timed steps.

Per configuration: real (non-pad) tokens / s, MFU (model FLOPs of the real tokens / step time / the
GPU's bf16 peak), peak allocated memory, the share of step time spent waiting for the DataLoader, and
`llava plan`'s memory estimate when that command exists.

    python benchmarks/gpu_bench.py --dry-run             # the plan of measurements (no GPU needed)
    python benchmarks/gpu_bench.py                       # all rows; results/gpu.json + a table
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

# llava-hf/llava-v1.6-mistral-7b-hf's config.json, the parts that decide cost
TEXT = {"vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768, "rope_theta": 1e6}
VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
          "image_size": 336, "patch_size": 14, "projection_dim": 768}
# bf16 dense peak TFLOPs by device name fragment (vendor data sheets); --peak-tflops overrides
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0,
               "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "B200": 2250.0}

BASE = {"attn": "sdpa", "packing": False, "compile": False, "liger": False, "checkpointing": False, "every_n": 1,
        "padding_mask": False}
# name: what differs from BASE (LoRA bf16 sdpa, length-grouped batches, mask-free attention, no checkpointing)
CONFIGS = {
    "lora_bf16_sdpa": {},
    "padding_mask": {"padding_mask": True},  # model.mask_free_attention=false: sdpa gets the padding mask
    "flash_attention_2": {"attn": "flash_attention_2"},
    "packing": {"packing": True},
    "compile": {"compile": True},
    "liger": {"liger": True},
    "checkpointing": {"checkpointing": True},
    "checkpointing_every_2": {"checkpointing": True, "every_n": 2},
    "all_on": {"attn": "flash_attention_2", "packing": True, "compile": True, "liger": True, "checkpointing": True},
}


def needs(settings: dict, gpu: bool = True) -> list[str]:
    """Why a configuration cannot run here (empty: it can)."""
    import importlib.util

    missing = []
    if settings["attn"] == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        missing.append("flash-attn not installed")
    if settings["liger"] and importlib.util.find_spec("liger_kernel") is None:
        missing.append("liger-kernel not installed")
    if settings["compile"] and gpu and importlib.util.find_spec("triton") is None:
        missing.append("triton not installed (inductor on GPU)")
    return missing


def lm_flops_per_token(seq: float) -> float:
    """Model FLOPs per real token, LoRA: forward 2P + input-gradient backward 2P over the LM linears,
    causal attention 6 s h per layer for rows of `seq` tokens (QK and AV, 4 x the mean context s/2 x h
    forward, twice that backward; packed rows overstate it a little); LoRA weight gradients are negligible.
    The head runs on trained positions only (counted per trained token by the caller)."""
    h, layers = TEXT["hidden_size"], TEXT["num_hidden_layers"]
    kv = h * TEXT["num_key_value_heads"] // TEXT["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * TEXT["intermediate_size"]
    return 4 * layers * per_layer + 6 * seq * h * layers


def vision_flops_per_image_token() -> float:
    """Frozen tower, forward only: 2 x its parameters per patch token."""
    h = VISION["hidden_size"]
    return 2 * VISION["num_hidden_layers"] * (4 * h * h + 2 * h * VISION["intermediate_size"])


def peak_tflops(name: str, override: float) -> float | None:
    if override:
        return override
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def plan_estimate(args) -> str | None:
    """`llava plan`'s memory estimate when the command exists (another part of llava-train), else None."""
    cmd = [sys.executable, "-m", "llava_train.cli", "plan", "model=llava-v1.6-mistral-7b", "peft=lora",
           f"trainer.per_device_train_batch_size={args.batch_size}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip()[-2000:]


# ---------------------------------------------------------------- one configuration (child process)


class TimedLoader:
    """Wraps the train DataLoader: time spent inside `next()` and real tokens of the batches handed out."""

    def __init__(self, loader, stats: dict):
        self.loader, self.stats = loader, stats

    def __iter__(self):
        it = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.stats["wait"].append(time.perf_counter() - start)
            mask = batch.get("attention_mask")
            real = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
            self.stats["tokens"].append(real)
            self.stats["trained"].append(int((batch["labels"][:, 1:] != -100).sum()))
            self.stats["image_tokens"].append(int((batch["input_ids"] == self.stats["image_id"]).sum()))
            self.stats["seq"].append(int(batch["input_ids"].shape[1]))
            yield batch

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


SMOKE_TEXT = {"vocab_size": 32064, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32768}
SMOKE_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                "image_size": 336, "patch_size": 14, "projection_dim": 32}


def run_one(name: str, args) -> dict:
    import torch
    from mixdata import real_geometry_processor
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        MistralConfig,
        TrainerCallback,
    )

    from llava_train.config import DataConfig, ModelConfig, PeftConfig, TinyModelConfig, TrainJobConfig
    from llava_train.data.templates import get_family
    from llava_train.model.adapt import apply_peft
    from llava_train.model.speed import apply_liger, compile_language_layers
    from llava_train.model.tiny import ensure_tiny_checkpoint, grid_pinpoints
    from llava_train.train.recipe import build_trainer

    s = {**BASE, **CONFIGS[name]}
    torch.backends.cuda.matmul.allow_tf32 = True
    work = Path(args.work)
    processor = real_geometry_processor(str(ensure_tiny_checkpoint(TinyModelConfig())))
    tok = processor.tokenizer
    data = work / "mix.json"
    model_cfg = ModelConfig(path="random-7b", family="mistral", dtype="fp32" if args.cpu_smoke else "bf16",
                            attn_implementation=s["attn"],
                            compile=s["compile"], liger=s["liger"], mask_free_attention=not s["padding_mask"])
    data_cfg = DataConfig(train_path=str(data), max_length=4096, packing=s["packing"], num_workers=args.workers,
                          pad_to_multiple_of=8)
    job = TrainJobConfig(model=model_cfg, data=data_cfg, peft=PeftConfig())
    t = job.trainer
    t.max_steps, t.per_device_train_batch_size = args.warmup + args.steps, args.batch_size
    t.logging_steps, t.save_steps, t.disable_tqdm = 10**6, 10**6, True
    t.gradient_checkpointing, t.checkpoint_every_n_layers = s["checkpointing"], s["every_n"]
    from llava_train.data.dataset import ConversationDataset
    from llava_train.data.encoder import Encoder
    from llava_train.data.images import ImageGeometry

    encoder = Encoder.from_config(tok, get_family("mistral"), ImageGeometry.from_processor(processor), job.data)
    train_ds = ConversationDataset(str(data), job.data, encoder, processor.image_processor)

    device, dtype = ("cpu", torch.float32) if args.cpu_smoke else ("cuda", torch.bfloat16)
    vision = CLIPVisionConfig(**(SMOKE_VISION if args.cpu_smoke else VISION))
    text = MistralConfig(**(SMOKE_TEXT if args.cpu_smoke else TEXT), pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    config = LlavaNextConfig(vision_config=vision, text_config=text,
                             image_token_index=tok.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=grid_pinpoints(336), vision_feature_select_strategy="default",
                             vision_feature_layer=-2, tie_word_embeddings=False)
    config._attn_implementation = s["attn"]
    torch.manual_seed(0)
    build = time.perf_counter()
    with torch.device(device):
        model = LlavaNextForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=s["attn"])
    if s["liger"]:
        apply_liger(model)
    model = apply_peft(model, job.peft, job.model, gradient_checkpointing=s["checkpointing"],
                       checkpoint_every_n_layers=s["every_n"])
    if s["compile"]:
        compile_language_layers(model, "aot_eager" if args.cpu_smoke else "inductor")
    build = time.perf_counter() - build

    stats = {"wait": [], "tokens": [], "trained": [], "image_tokens": [], "seq": [], "step_end": [],
             "image_id": tok.convert_tokens_to_ids("<image>")}

    cuda = device == "cuda"

    class StepClock(TrainerCallback):
        def on_step_end(self, args_, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            stats["step_end"].append(time.perf_counter())
            if state.global_step == args.warmup and cuda:
                torch.cuda.reset_peak_memory_stats()

    job.output_dir = str(work / f"out-{name}")
    trainer = build_trainer(job, model, train_ds, processor, Path(job.output_dir), callbacks=[StepClock()])
    original = trainer.get_train_dataloader
    trainer.get_train_dataloader = lambda: TimedLoader(original(), stats)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    ends = stats["step_end"]
    w = args.warmup
    timed = ends[-1] - ends[w - 1] if w > 0 else ends[-1] - ends[0]
    steps = len(ends) - max(w, 1)
    # batches w .. end are the timed steps (gradient_accumulation_steps = 1)
    sl = slice(w, w + steps) if w > 0 else slice(1, 1 + steps)
    tokens, trained, images = sum(stats["tokens"][sl]), sum(stats["trained"][sl]), sum(stats["image_tokens"][sl])
    seq = sum(stats["seq"][sl]) / max(steps, 1)
    flops = tokens * lm_flops_per_token(seq) + trained * 2 * 2 * TEXT["hidden_size"] * TEXT["vocab_size"]
    flops += images * vision_flops_per_image_token()
    device = torch.cuda.get_device_name() if cuda else "cpu (smoke test: tiny shapes, numbers meaningless)"
    peak = peak_tflops(device, args.peak_tflops) if cuda else None
    return {
        "settings": s, "device": device, "steps_timed": steps, "seconds_timed": round(timed, 2),
        "build_seconds": round(build, 1), "real_tokens": tokens, "trained_tokens": trained,
        "tokens_per_s": round(tokens / timed, 1), "achieved_tflops": round(flops / timed / 1e12, 1),
        "mfu": round(flops / timed / (peak * 1e12), 3) if peak else None,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
        "dataloader_wait_share": round(sum(stats["wait"][sl]) / timed, 3),
    }


# ---------------------------------------------------------------- orchestration


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the plan of measurements and exit")
    p.add_argument("--only", default="", help="comma-separated subset of " + ",".join(CONFIGS))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    p.add_argument("--budget-s", type=int, default=570, help="stop starting rows after this many seconds")
    p.add_argument("--row-timeout-s", type=int, default=240)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 peak of this GPU (default: by name)")
    p.add_argument("--out", default=str(HERE / "results" / "gpu.json"))
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the rows that can run on CPU at tiny shapes (checks the script; numbers meaningless)")
    p.add_argument("--run", help=argparse.SUPPRESS)  # child: one configuration
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.run:
        print("RESULT " + json.dumps(run_one(args.run, args)), flush=True)
        return
    names = [n for n in CONFIGS if not args.only or n in args.only.split(",")]
    samples = args.batch_size * (args.warmup + args.steps) * 2  # packing rows hold ~2 samples
    print(f"plan: {len(names)} configurations at llava-v1.6-mistral-7b shapes (random weights, bf16, LoRA r=16), "
          f"batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps each, {samples} LLaVA-mix "
          f"samples, {args.workers} DataLoader workers; budget {args.budget_s} s, {args.row_timeout_s} s per row")
    print("| configuration | attention | packing | compile | liger | checkpointing | runs here? |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        s = {**BASE, **CONFIGS[n]}
        ck = ("every layer" if s["every_n"] == 1 else f"every {s['every_n']} layers") if s["checkpointing"] else "off"
        why = needs(s)
        print(f"| {n} | {s['attn']} | {s['packing']} | {s['compile']} | {s['liger']} | {ck} | "
              f"{'skip: ' + '; '.join(why) if why else 'yes'} |")
    print("measures: real tokens/s, MFU (model FLOPs / bf16 peak), peak allocated GB, DataLoader wait share, "
          "llava plan's estimate (when that command exists)")
    if args.dry_run:
        return

    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        sys.exit("no CUDA GPU: run with --dry-run for the plan")
    from mixdata import make_set

    work = Path(tempfile.mkdtemp(prefix="llava-gpu-bench-"))
    src = make_set(work, samples, seed=0)
    shutil.move(str(src), str(work / "mix.json"))
    start = time.time()
    rows: dict[str, dict] = {}
    for n in names:
        why = needs({**BASE, **CONFIGS[n]}, gpu=not args.cpu_smoke)
        if args.cpu_smoke and CONFIGS[n].get("liger"):
            why.append("Liger needs CUDA")
        if why:
            rows[n] = {"skipped": "; ".join(why)}
            continue
        left = args.budget_s - (time.time() - start)
        if left < 60:
            rows[n] = {"skipped": f"out of the {args.budget_s} s budget"}
            continue
        cmd = [sys.executable, __file__, "--run", n, "--work", str(work), "--batch-size", str(args.batch_size),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--workers", str(args.workers),
               "--peak-tflops", str(args.peak_tflops)] + (["--cpu-smoke"] if args.cpu_smoke else [])
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=min(args.row_timeout_s, left))
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            rows[n] = json.loads(line[-1][7:]) if line else {"error": (out.stderr or out.stdout)[-1500:]}
        except subprocess.TimeoutExpired:
            rows[n] = {"error": f"timed out after {min(args.row_timeout_s, left):.0f} s"}
        print(f"{n}: {json.dumps(rows[n])[:300]}", flush=True)
    plan = plan_estimate(args)
    result = {"model": "llava-v1.6-mistral-7b shapes, random weights", "text": TEXT, "vision": VISION,
              "batch_size": args.batch_size, "warmup_steps": args.warmup, "timed_steps": args.steps,
              "dataloader_workers": args.workers, "llava_plan": plan, "seconds": round(time.time() - start),
              "results": rows}
    print("\n| configuration | tokens/s | MFU | peak GB | DataLoader wait | note |\n|---|---|---|---|---|---|")
    for n, r in rows.items():
        if "tokens_per_s" in r:
            print(f"| {n} | {r['tokens_per_s']} | {r['mfu']} | {r['peak_memory_gb']} | "
                  f"{r['dataloader_wait_share']:.1%} | |")
        else:
            note = r.get("skipped") or (r.get("error", "").strip().splitlines() or [""])[-1][:150]
            print(f"| {n} | | | | | {note} |")
    if plan:
        print(f"\nllava plan (batch {args.batch_size}):\n{plan}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
