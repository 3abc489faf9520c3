"""Data pipeline: how much of each batch is real work, and samples/s per DataLoader worker.

On a generated LLaVA-mix-shaped set with real JPEG files (benchmarks/mixdata.py) at llava-v1.6's real
geometry (336 px, patch 14, the 5 pinpoints; the tiny checkpoint's Mistral tokenizer), over one epoch:
- real tokens: non-pad tokens / all token slots of the batches;
- real patches: pixel patches of real image crops / all patch slots;
- samples/s per worker: one DataLoader worker decoding, preprocessing and collating batches;
for
- baseline: random batches, the processor called on the batch with its fixed 5-patch padding (what
  users get from TRL's VLM path: `processor(text=..., images=..., padding=True)`),
- grouped: length + modality grouping (data.group_by_length / group_by_modality) planned, as training plans,
  from the lazy index's length estimates with image sizes from the headers (the default); the same with every
  image at the assumed size (data.image_sizes=assumed); and with exact lengths (the bound),
- budget: token-budget batches (data.max_tokens_per_batch),
- packing: data.packing=true (rows of up to max_length).

    python benchmarks/data_pipeline.py                  # 2,000 samples, batch 8
    python benchmarks/data_pipeline.py --samples 10000 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def shares(batches, lengths, patches, has_image, *, fixed_patches=None, pack_length=None):
    """(real token share, real patch share) of a list of batches."""
    from llava_train.data.packing import pack_bins

    real_tok = slots_tok = real_p = slots_p = 0
    for b in batches:
        if pack_length:
            rows = pack_bins(b, lengths, pack_length)
            width = max(sum(lengths[i] for i in r) for r in rows)
            slots_tok += len(rows) * width
        else:
            slots_tok += len(b) * max(lengths[i] for i in b)
        real_tok += sum(lengths[i] for i in b)
        imgs = [patches[i] for i in b if has_image[i]]
        if imgs:
            real_p += sum(imgs)
            slots_p += len(imgs) * (fixed_patches or max(imgs))
    return real_tok / slots_tok, (real_p / slots_p if slots_p else 1.0)


class RawDataset:
    """What TRL's VLM path sees: the rendered prompt+reply text with <image> and the decoded image."""

    def __init__(self, ds, family):
        self.ds, self.family = ds, family

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        from llava_train.data.images import load_rgb

        conv, _ = self.ds.items[i]
        text = "".join(p.text for p in self.family.pieces(conv.turns))
        return text, [load_rgb(r, self.ds.image_root, conv, k) for k, r in enumerate(conv.images)]


class ProcessorCollator:
    def __init__(self, processor):
        self.processor = processor

    def __call__(self, rows):
        texts = [t for t, _ in rows]
        images = [im for _, ims in rows for im in ims]
        return self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")


def throughput(dataset, batches, collate, workers: int, n_batches: int) -> float:
    """Samples/s of one DataLoader worker over `n_batches` batches (after the first, which pays start-up)."""
    import torch

    batches = batches[: n_batches + 1]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                                         prefetch_factor=2 if workers else None)
    it = iter(loader)
    next(it)
    t = time.time()
    n = 0
    for k, _ in enumerate(it):
        n += len(batches[k + 1])
    return n / (time.time() - t) / max(workers, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--pack-lengths", default="4096,8192", help="packing row lengths to report (comma-separated)")
    p.add_argument("--max-tokens", type=int, default=0, help="token budget (default: batch size x 2,400)")
    p.add_argument("--throughput-batches", type=int, default=12, help="batches timed per mode (0: skip)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "data_pipeline.json"))
    args = p.parse_args()

    from mixdata import make_set, real_geometry_processor

    from llava_train.config import DataConfig, TinyModelConfig
    from llava_train.data.collate import Collator
    from llava_train.data.dataset import ConversationDataset
    from llava_train.data.encoder import Encoder
    from llava_train.data.images import ImageGeometry, num_patches
    from llava_train.data.index import LazyConversationDataset
    from llava_train.data.packing import PackingCollator
    from llava_train.data.sampler import PlanSpec, plan_epoch
    from llava_train.data.templates import get_family
    from llava_train.model.tiny import ensure_tiny_checkpoint

    work = Path(tempfile.mkdtemp(prefix="llava-pipeline-"))
    t = time.time()
    path = make_set(work, args.samples, seed=args.seed)
    print(f"generated {args.samples} samples with real JPEG files in {time.time() - t:.0f} s ({work})", flush=True)
    proc = real_geometry_processor(str(ensure_tiny_checkpoint(TinyModelConfig())))
    backend = type(proc.image_processor).__name__
    geo = ImageGeometry.from_processor(proc)
    family = get_family("mistral")
    enc = Encoder(proc.tokenizer, family, geo, max_length=args.max_length)
    cfg = DataConfig(train_path=str(path), max_length=args.max_length)
    ds = ConversationDataset(str(path), cfg, enc, proc.image_processor)
    lengths = list(ds.lengths)
    has_image = [bool(conv.images) for conv, _ in ds.items]
    patches = [sum(num_patches(h, w, geo) for h, w in sizes) for _, sizes in ds.items]
    # training plans with the lazy index's estimates (data/index.py); the shares below are of the exact lengths
    t = time.time()
    lazy = LazyConversationDataset(str(path), cfg, enc, proc.image_processor).lengths  # data.image_sizes=headers
    index_s = time.time() - t
    assumed = LazyConversationDataset(str(path), DataConfig(train_path=str(path), max_length=args.max_length,
                                                            image_sizes="assumed"), enc, proc.image_processor).lengths
    est_err = {name: round(sum(abs(a - b) for a, b in zip(est, lengths)) / sum(lengths), 3)
               for name, est in (("headers", lazy), ("assumed", assumed))}

    B = args.batch_size
    budget = args.max_tokens or B * 2400
    plans = {
        "baseline (random, 5-patch pad)": (PlanSpec(B, group_by_length=False, group_by_modality=False), 5, None, lazy),
        "grouped (length+modality)": (PlanSpec(B), None, None, lazy),
        "grouped, image sizes assumed": (PlanSpec(B), None, None, assumed),
        "grouped, exact lengths": (PlanSpec(B), None, None, lengths),
        f"token budget ({budget})": (PlanSpec(B, max_tokens=budget), None, None, lazy),
    }
    for n in (int(x) for x in args.pack_lengths.split(",")):
        plans[f"packing (rows of {n})"] = (PlanSpec(max(1, B * args.max_length // n), pack_length=n), None, n, lazy)
    pad = proc.tokenizer.pad_token_id
    rows = []
    for name, (spec, fixed, pack, plan_lengths) in plans.items():
        batches = plan_epoch(plan_lengths, has_image, spec, seed=args.seed, epoch=0)
        tok, pat = shares(batches, lengths, patches, has_image, fixed_patches=fixed, pack_length=pack)
        sps = None
        if args.throughput_batches:
            if fixed:
                sps = throughput(RawDataset(ds, family), batches, ProcessorCollator(proc), args.workers,
                                 args.throughput_batches)
            else:
                col = PackingCollator(pad, pack) if pack else Collator(pad)
                sps = throughput(ds, batches, col, args.workers, args.throughput_batches)
        rows.append({"mode": name, "real_tokens": round(tok, 4), "real_patches": round(pat, 4),
                     "samples_per_s_per_worker": None if sps is None else round(sps, 2), "batches": len(batches),
                     "mean_samples_per_batch": round(len(lengths) / len(batches), 2)})
        print(f"  {name}: done", flush=True)

    result = {"settings": {"samples": len(lengths), "text_only_share": round(1 - sum(has_image) / len(lengths), 3),
                           "batch_size": B, "max_length": args.max_length, "token_budget": budget,
                           "geometry": "336 px, patch 14, 5 pinpoints, 1 extra token", "tokenizer": "Mistral-7B",
                           "image_processor": backend, "workers": args.workers, "cpu_cores": os.cpu_count(),
                           "mean_length": round(sum(lengths) / len(lengths)),
                           "lazy_index_length_estimate_mean_abs_error": est_err,
                           "lazy_index_s_with_header_sizes": round(index_s, 2),
                           "plans": "from the lazy index's estimates (data.image_sizes=headers, the default) "
                                    "unless the row says otherwise; shares of the exact lengths"},
              "rows": rows,
              "targets": {"grouped_real_tokens": 0.97, "grouped_real_patches": 0.95, "packing_real_tokens": 0.99}}
    print(f"\n{len(lengths)} samples ({result['settings']['text_only_share']:.1%} text-only), batch {B}, "
          f"max_length {args.max_length}, image processor {backend}\n")
    print(f"| {'mode':<32} | real tokens | real patches | samples/s/worker | samples/batch |")
    print(f"|{'-' * 34}|-------------|--------------|------------------|---------------|")
    for r in rows:
        sps = "-" if r["samples_per_s_per_worker"] is None else f"{r['samples_per_s_per_worker']:.1f}"
        print(f"| {r['mode']:<32} | {r['real_tokens']:>10.1%} | {r['real_patches']:>11.1%} | {sps:>16} | "
              f"{r['mean_samples_per_batch']:>13} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
