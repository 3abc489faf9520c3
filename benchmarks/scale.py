"""Scale: start-to-first-batch time and peak RSS per rank, the training data path next to today's.

Two sources, LLaVA-mix-shaped (benchmarks/mixdata.py):
- json: a JSON list (like llava_v1_5_mix665k.json, default 3.5M records) referencing image files; a pool
  of real JPEGs backs most references and a share point at missing files (counted at fetch, never silent);
- parquet: rows with the image bytes embedded (default >= 2 GB on disk; a pool of real JPEGs repeated).
Every rank is a separate process that builds the training dataset (`LazyConversationDataset`: lazy, for
every source kind), its share of the length/modality-grouped batch plan and a DataLoader with workers,
and fetches its first batch. "cold" = no saved index, no saved image sizes and no HF Arrow cache (one rank
scans / converts and reads the image headers, the other waits on the lock); "warm" = a restart; for the
JSON source also cold with `data.image_sizes=assumed` (no image header read at start).

Today's default path (the landed eager `ConversationDataset`: every sample tokenised and header-read on
every rank; Arrow rows with their image bytes kept in Python) is measured in the same run on the first
`--today-samples` records with the landed code (`--today-code`), and its time and RSS are extrapolated
linearly to the full size (labelled as such: running it whole takes hours).

    python benchmarks/scale.py --workdir /tmp/scale          # 3.5M JSON + >= 2 GB parquet, 2 ranks x 2 workers
    python benchmarks/scale.py --samples 500000 --parquet-gb 0.5 --workdir /tmp/scale-small
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
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def make_json(folder: Path, n: int, present: int, missing_share: float, seed: int = 0) -> Path:
    from mixdata import record, write_jpeg

    rnd = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    pool_sizes = {}
    templates = [record(rnd, i) for i in range(5000)]  # distinct texts; records reuse them with their own id
    path = folder / "mix.json"
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


def make_parquet(folder: Path, gigabytes: float, present: int, seed: int = 1) -> tuple[Path, int]:
    """Rows {id, image: {bytes, path}, conversations} with embedded JPEG bytes until the file holds
    `gigabytes` of image payload (no dictionary encoding or compression of the bytes: each row stores its own)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mixdata import record, write_jpeg

    rnd = random.Random(seed)
    pool = []
    for k in range(present):
        rec, size = record(rnd, k)
        size = size or (640, 480)
        p = folder / "pool.jpg"
        write_jpeg(p, size, rnd)
        pool.append(p.read_bytes())
    path = folder / "mix.parquet"
    schema = pa.schema([("id", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])))])
    target, written, n = gigabytes * 2**30, 0, 0
    with pq.ParquetWriter(path, schema, use_dictionary=["id"], compression="snappy") as w:
        while written < target:
            rows = {"id": [], "image": [], "conversations": []}
            for _ in range(2000):
                rec, size = record(rnd, n)  # text-only records (size None) have no <image>
                data = pool[n % len(pool)] if size else None
                rows["id"].append(f"pq-{n:07d}")
                rows["image"].append({"bytes": data, "path": None} if data else None)
                rows["conversations"].append(rec["conversations"])
                written += len(data) if data else 0
                n += 1
            w.write_table(pa.Table.from_pydict(rows, schema=schema), row_group_size=2000)
    (folder / "pool.jpg").unlink()
    return path, n


def rank_main(args) -> None:
    import torch
    from mixdata import real_geometry_processor

    from llava_train.config import DataConfig, TinyModelConfig
    from llava_train.data.collate import Collator
    from llava_train.data.dataset import ConversationDataset
    from llava_train.data.encoder import Encoder
    from llava_train.data.images import ImageGeometry
    from llava_train.data.sampler import PlanSampler, PlanSpec
    from llava_train.data.templates import get_family
    from llava_train.model.tiny import ensure_tiny_checkpoint

    t_imports = time.time() - T0
    proc = real_geometry_processor(str(ensure_tiny_checkpoint(TinyModelConfig())))
    cfg = DataConfig(train_path=args.path, max_length=4096, on_error="skip",
                     image_sizes="assumed" if args.mode == "lazy-assumed" else "headers")
    enc = Encoder(proc.tokenizer, get_family("mistral"), ImageGeometry.from_processor(proc), max_length=4096)
    rss_before = current_rss_mb()  # not the peak so far: the extrapolation scales what the index adds
    t_index = time.time()
    if args.mode == "today":
        ds = ConversationDataset(args.path, cfg, enc, proc.image_processor)
        has_image = [bool(conv.images) for conv, _ in ds.items]
    else:
        from llava_train.data.index import LazyConversationDataset

        ds = LazyConversationDataset(args.path, cfg, enc, proc.image_processor)
        has_image = ds.has_image
    t_index = time.time() - t_index
    spec = PlanSpec(batch_size=args.batch_size, world_size=args.world)
    sampler = PlanSampler(ds.lengths, has_image, spec, seed=0, rank=args.rank)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(proc.tokenizer.pad_token_id),
                                         num_workers=args.workers, prefetch_factor=2 if args.workers else None)
    batch = next(iter(loader))
    first = time.time() - T0
    me = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"rank": args.rank, "samples": len(ds), "imports_seconds": round(t_imports, 1),
                      "index_seconds": round(t_index, 1), "first_batch_seconds": round(first, 1),
                      "rss_before_index_mb": round(rss_before),
                      "cpu_seconds": round(me.ru_utime + me.ru_stime, 1), "batch_shape": list(batch["input_ids"].shape),
                      "steps_per_epoch": len(sampler), "peak_rss_mb": round(me.ru_maxrss / 1024),
                      "peak_worker_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
                      "skipped_so_far": ds.skipped.total}))


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def run_ranks(args, path: Path, mode: str, code: Path) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), str(HERE)]))
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--mode", mode, "--rank", str(r), "--world",
                               str(args.ranks), "--path", str(path), "--batch-size", str(args.batch_size),
                               "--workers", str(args.workers)], stdout=subprocess.PIPE, env=env, text=True)
             for r in range(args.ranks)]
    ranks = []
    for pr in procs:
        out, _ = pr.communicate()
        if pr.returncode:
            raise SystemExit(f"a rank failed (exit {pr.returncode})")
        ranks.append(json.loads(out.strip().splitlines()[-1]))
    return ranks


def head(path: Path, n: int, out: Path) -> Path:
    """The first n records of a JSON list or a parquet file (for today's path)."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_batches([next(pq.ParquetFile(path).iter_batches(batch_size=n))]), out)
        return out
    records = []
    with open(path) as f:
        dec = json.JSONDecoder()
        buf, pos = f.read(64 << 20), 0
        pos = buf.index("{")
        while len(records) < n:
            rec, end = dec.raw_decode(buf, pos)
            records.append(rec)
            pos = buf.index("{", end) if "{" in buf[end:end + 16] else len(buf)
            if pos >= len(buf) - (1 << 20):
                buf, pos = buf[pos:] + f.read(64 << 20), 0
    out.write_text(json.dumps(records))
    for src in (path.parent / "images",):
        link = out.parent / "images"
        if src.exists() and not link.exists():
            link.symlink_to(src)
    return out


def clear_caches(work: Path, hf_cache: Path) -> None:
    import shutil

    for pattern in ("*.lazyindex.*", "*.imagesizes.*"):
        for f in work.rglob(pattern):
            f.unlink()
    shutil.rmtree(hf_cache, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=3_500_000, help="records of the JSON source")
    p.add_argument("--parquet-gb", type=float, default=2.0, help="image payload of the parquet source")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--present", type=int, default=500, help="distinct real JPEG files backing the references")
    p.add_argument("--missing-share", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--today-samples", type=int, default=20_000, help="records today's eager path is run on")
    p.add_argument("--today-code", default="/work/main", help="checkout of the landed code (today's path)")
    p.add_argument("--sources", default="json,parquet")
    p.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    p.add_argument("--workdir", required=False, default="/tmp/llava-scale")
    p.add_argument("--note", default="")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="lazy", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--path", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return rank_main(args)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    hf_cache = work / "hf-cache"
    os.environ["HF_DATASETS_CACHE"] = str(hf_cache)  # inherited by the ranks: the cold run converts once
    from llava_train.config import TinyModelConfig
    from llava_train.model.tiny import ensure_tiny_checkpoint

    ensure_tiny_checkpoint(TinyModelConfig())  # once, not raced by the ranks (its tokenizer is used)
    result = {"note": args.note, "sources": {}, "settings": {
        "world_size": args.ranks, "batch_size": args.batch_size, "workers_per_rank": args.workers,
        "present_images": args.present, "missing_share": args.missing_share, "max_length": 4096,
        "geometry": "336 px, patch 14, 5 pinpoints", "cpu_cores": os.cpu_count(),
        "today_samples": args.today_samples}, "targets": {"first_batch_seconds": 60, "peak_rss_mb": 4096}}
    rows = []
    for kind in args.sources.split(","):
        t = time.time()
        if kind == "json":
            path, n = work / "mix.json", args.samples
            if not path.exists():
                path = make_json(work, n, args.present, args.missing_share)
        else:
            path = work / "mix.parquet"
            meta = work / "mix.parquet.rows"
            if not path.exists():
                path, n = make_parquet(work, args.parquet_gb, args.present)
                meta.write_text(str(n))
            n = int(meta.read_text())
        gen = time.time() - t
        size_mb = path.stat().st_size / 2**20
        print(f"{kind}: {n} samples, {size_mb:.0f} MB ({gen:.0f} s to write) at {path}", flush=True)
        runs = {}
        for run in ("cold", "warm") + (("cold, data.image_sizes=assumed",) if kind == "json" else ()):
            if run.startswith("cold"):
                clear_caches(work, hf_cache)
            load = os.getloadavg()[0]
            mode = "lazy-assumed" if "assumed" in run else "lazy"
            runs[run] = {"load_average_at_start": round(load, 1), "ranks": run_ranks(args, path, mode, HERE.parent)}
        small = head(path, args.today_samples, work / f"head{path.suffix}")
        clear_caches(work, hf_cache)
        load = os.getloadavg()[0]
        today = run_ranks(args, small, "today", Path(args.today_code))
        scale = n / args.today_samples
        for r in today:
            # the index build scales with the samples; imports, model files and the first fetch do not
            r["extrapolated_first_batch_seconds"] = round(r["first_batch_seconds"] + r["index_seconds"] * (scale - 1))
            r["extrapolated_peak_rss_mb"] = round(r["rss_before_index_mb"]
                                                  + (r["peak_rss_mb"] - r["rss_before_index_mb"]) * scale)
        runs["today (measured on the head, extrapolated)"] = {"load_average_at_start": round(load, 1), "ranks": today}
        result["sources"][kind] = {"samples": n, "size_mb": round(size_mb), "runs": runs}
        for run, v in runs.items():
            for r in v["ranks"]:
                rows.append((kind, run, r, v["load_average_at_start"]))
    print("\n| source | run | rank | first batch s | index s | CPU s | peak RSS MB | worker RSS MB | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, run, r, load in rows:
        fb = r["first_batch_seconds"] if "extrapolated_first_batch_seconds" not in r else \
            f"{r['first_batch_seconds']} (x{round(result['sources'][kind]['samples'] / args.today_samples)}: " \
            f"~{r['extrapolated_first_batch_seconds']})"
        rss = r["peak_rss_mb"] if "extrapolated_peak_rss_mb" not in r else \
            f"{r['peak_rss_mb']} (~{r['extrapolated_peak_rss_mb']})"
        print(f"| {kind} | {run} | {r['rank']} | {fb} | {r['index_seconds']} | {r['cpu_seconds']} | {rss} | "
              f"{r['peak_worker_rss_mb']} | {load} |")
    ok = all(r["first_batch_seconds"] <= 60 and r["peak_rss_mb"] <= 4096 for kind, run, r, _ in rows
             if not run.startswith("today"))
    print(f"targets (first batch <= 60 s, RSS <= 4 GB per rank) for the training path: {'met' if ok else 'NOT met'}")
    result["targets_met"] = ok
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
