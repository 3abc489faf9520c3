"""Pixel values per image: transformers' PIL LLaVA-NeXT image processor vs llava-train's path (data/pixels.py).

The real checkpoints' processor config (336 px, the 5 anyres pinpoints), decoded RGB images of common
shapes (JPEG round trip), one thread, each call timed `--repeats` times (median); both outputs are
checked bit-identical before timing. Writes `benchmarks/results/pixels.json` and a table.

    python benchmarks/pixels.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

SIZES = [(640, 480), (480, 640), (500, 375), (1024, 768), (336, 336), (1000, 300), (1920, 1080)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=str(HERE / "results" / "pixels.json"))
    args = p.parse_args()

    import numpy as np
    import torch
    from mixdata import real_geometry_processor, write_jpeg
    from PIL import Image

    from llava_train.config import TinyModelConfig
    from llava_train.data.pixels import FastLlavaNextPixels, ProcessorPixels, pixel_fn
    from llava_train.model.tiny import ensure_tiny_checkpoint

    torch.set_num_threads(1)
    ip = real_geometry_processor(str(ensure_tiny_checkpoint(TinyModelConfig()))).image_processor
    fast, hf = pixel_fn(ip), ProcessorPixels(ip)
    if not isinstance(fast, FastLlavaNextPixels):
        raise SystemExit(f"the fast path does not apply to {type(ip).__name__} (torchvision installed?)")
    rows = []
    work = Path(tempfile.mkdtemp(prefix="llava-pixels-"))
    for w, h in SIZES:
        write_jpeg(work / "img.jpg", (w, h), random.Random(w * h))  # the benchmark mix's photo-like JPEGs
        img = Image.open(work / "img.jpg").convert("RGB")
        want, got = hf([img])[0], fast([img])[0]
        assert np.array_equal(want, got), (w, h)
        times = {}
        for name, fn in (("processor", hf), ("llava_train", fast)):
            each = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                fn([img])
                each.append(time.perf_counter() - t)
            times[name] = statistics.median(each) * 1000
        rows.append({"width": w, "height": h, "patches": int(got.shape[0]),
                     "processor_ms": round(times["processor"], 2), "llava_train_ms": round(times["llava_train"], 2),
                     "speedup": round(times["processor"] / times["llava_train"], 2), "bit_identical": True})
    shutil.rmtree(work, ignore_errors=True)
    result = {"settings": {"processor": type(ip).__name__, "geometry": "336 px, 5 pinpoints (llava-v1.6)",
                           "threads": 1, "repeats": args.repeats, "cpu_cores": os.cpu_count(),
                           "loadavg": os.getloadavg(),
                           "images": "the benchmark mix's photo-like JPEGs (mixdata.write_jpeg), decoded to RGB"},
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| image | patches | processor ms | llava-train ms | speed-up |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['width']}x{r['height']} | {r['patches']} | {r['processor_ms']} | {r['llava_train_ms']} | "
              f"{r['speedup']}x |")


if __name__ == "__main__":
    main()
