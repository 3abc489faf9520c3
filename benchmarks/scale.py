"""Scale: start-to-first-batch time and peak RSS per rank on a 665k-sample LLaVA-mix-shaped index.

The index is a JSON list (like llava_v1_5_mix665k.json) whose records reference images; a pool of real
JPEG files backs most references and a share point at files that do not exist (counted at fetch, never
silent). Every rank is a separate process that builds the lazy index (data/index.py), its share of the
length/modality-grouped batch plan and a DataLoader with workers, and fetches its first batch.

    python benchmarks/scale.py                      # 665k samples, 2 ranks
    python benchmarks/scale.py --samples 100000 --ranks 4
"""

from __future__ import annotations

import argparse
import time

T0 = time.time()

import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def make_index(folder: Path, n: int, present: int, missing_share: float, seed: int = 0) -> Path:
    from mixdata import record, write_jpeg

    rnd = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    pool_sizes = {}
    templates = []
    for i in range(5000):  # distinct texts; records reuse them with their own id and image
        rec, size = record(rnd, i)
        templates.append((rec, size))
    path = folder / "mix665k.json"
    with open(path, "w") as f:
        f.write("[\n")
        for i in range(n):
            rec, size = templates[i % len(templates)]
            rec = dict(rec, id=f"{rec['id'].split('-')[0]}-{i:07d}")
            if size:
                if rnd.random() < missing_share:
                    rec["image"] = f"coco/train2017/{i:012d}.jpg"  # not present
                else:
                    k = i % present
                    rec["image"] = f"images/{k:05d}.jpg"
                    if k not in pool_sizes:
                        pool_sizes[k] = size
                        write_jpeg(folder / rec["image"], size, rnd)
            f.write(("" if i == 0 else ",\n") + json.dumps(rec))
        f.write("\n]\n")
    return path


def rank_main(args) -> None:
    import torch
    from mixdata import real_geometry_processor

    from llava_train.config import DataConfig, TinyModelConfig
    from llava_train.data.collate import Collator
    from llava_train.data.dataset import Encoder
    from llava_train.data.images import ImageGeometry
    from llava_train.data.index import LazyConversationDataset
    from llava_train.data.sampler import PlanSampler, PlanSpec
    from llava_train.data.templates import get_family
    from llava_train.model.tiny import ensure_tiny_checkpoint

    t_imports = time.time() - T0
    proc = real_geometry_processor(str(ensure_tiny_checkpoint(TinyModelConfig())))
    cfg = DataConfig(train_path=args.path, max_length=4096, on_error="skip", lazy_index=True)
    enc = Encoder(proc.tokenizer, get_family("mistral"), ImageGeometry.from_processor(proc), max_length=4096)
    t_index = time.time()
    ds = LazyConversationDataset(args.path, cfg, enc, proc.image_processor)
    t_index = time.time() - t_index
    spec = PlanSpec(batch_size=args.batch_size, world_size=args.world)
    sampler = PlanSampler(ds.lengths, ds.has_image, spec, seed=0, rank=args.rank)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(proc.tokenizer.pad_token_id),
                                         num_workers=args.workers, prefetch_factor=2 if args.workers else None)
    batch = next(iter(loader))
    first = time.time() - T0
    me = resource.getrusage(resource.RUSAGE_SELF)
    cpu = me.ru_utime + me.ru_stime
    rss_self = me.ru_maxrss / 1024
    rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"rank": args.rank, "samples": len(ds), "imports_seconds": round(t_imports, 1),
                      "index_seconds": round(t_index, 1), "image_processor": type(proc.image_processor).__name__,
                      "first_batch_seconds": round(first, 1), "cpu_seconds": round(cpu, 1),
                      "batch_shape": list(batch["input_ids"].shape),
                      "steps_per_epoch": len(sampler), "peak_rss_mb": round(rss_self),
                      "peak_worker_rss_mb": round(rss_children), "fetch_errors_so_far": ds.fetch_errors.value}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=665_000)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--present", type=int, default=500, help="distinct real JPEG files backing the references")
    p.add_argument("--missing-share", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    p.add_argument("--workdir", default="")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--path", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return rank_main(args)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="llava-scale-"))
    t = time.time()
    path = work / "mix665k.json"
    if not (args.workdir and path.exists()):  # a given workdir keeps the generated index for reruns
        path = make_index(work, args.samples, args.present, args.missing_share)
    gen = time.time() - t
    size_mb = path.stat().st_size / 2**20
    print(f"index: {args.samples} samples, {size_mb:.0f} MB, written in {gen:.0f} s ({path})", flush=True)
    from llava_train.config import TinyModelConfig
    from llava_train.model.tiny import ensure_tiny_checkpoint

    ensure_tiny_checkpoint(TinyModelConfig())  # once, not raced by the ranks (its tokenizer is used)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    runs = {}
    for run in ("cold", "warm"):  # cold: no saved index (one rank scans, the others wait); warm: a restart
        if run == "cold":
            for f in work.glob("*.lazyindex.*"):
                f.unlink()
        load = os.getloadavg()[0]
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--rank", str(r), "--world",
                                   str(args.ranks), "--path", str(path), "--batch-size", str(args.batch_size),
                                   "--workers", str(args.workers)], stdout=subprocess.PIPE, env=env, text=True)
                 for r in range(args.ranks)]
        ranks = []
        for pr in procs:
            out, _ = pr.communicate()
            if pr.returncode:
                raise SystemExit(f"a rank failed (exit {pr.returncode})")
            ranks.append(json.loads(out.strip().splitlines()[-1]))
        runs[run] = {"load_average_at_start": round(load, 1), "ranks": ranks}
    result = {"samples": args.samples, "index_mb": round(size_mb), "runs": runs,
              "settings": {"world_size": args.ranks, "batch_size": args.batch_size, "workers_per_rank": args.workers,
                           "present_images": args.present, "missing_share": args.missing_share,
                           "geometry": "336 px, patch 14, 5 pinpoints", "max_length": 4096,
                           "cpu_cores": os.cpu_count()},
              "targets": {"first_batch_seconds": 30, "peak_rss_mb": 2048}}
    print("\n| run | rank | first batch s | index s | imports s | CPU s | peak RSS MB | worker RSS MB | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run, r in ((run, r) for run, v in runs.items() for r in v["ranks"]):
        print(f"| {run} | {r['rank']} | {r['first_batch_seconds']} | {r['index_seconds']} | {r['imports_seconds']} | "
              f"{r['cpu_seconds']} | {r['peak_rss_mb']} | {r['peak_worker_rss_mb']} | "
              f"{runs[run]['load_average_at_start']} |")
    ok = all(r["first_batch_seconds"] <= 30 and r["peak_rss_mb"] <= 2048 for v in runs.values() for r in v["ranks"])
    print(f"steps per rank and epoch: {runs['cold']['ranks'][0]['steps_per_epoch']}; "
          f"targets (first batch <= 30 s, RSS <= 2 GB per rank): {'met' if ok else 'NOT met'}")
    result["targets_met"] = ok
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if not args.workdir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
