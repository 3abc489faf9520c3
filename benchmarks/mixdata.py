"""A LLaVA-mix-shaped data set (llava_v1_5_mix665k-like) for the benchmarks.

Sample kinds and shares follow the published mix: VQAv2/GQA-style short QA with many turns, LLaVA-Instruct
conversations and detailed descriptions, OCR-VQA (book covers), region/RefCOCO-style short turns, and
~6 % text-only ShareGPT conversations with long replies. Images are mostly COCO sizes (640x480,
480x640, 640x427, 500x375, ...), plus Visual Genome, book covers and TextCaps sizes. Text is random
English words (token counts close to real text with the Mistral tokenizer).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the a of and to in is on with what color man woman people sitting standing next table picture image "
         "shows there are two three white black red blue green large small dog cat car street building sky "
         "tree water wearing holding looking background front left right top bottom side near several "
         "answer question describe detail book title author genre this that which where how many kind "
         "person group food plate pizza train bus sign room window wall kitchen bed field grass player ball "
         "game tennis baseball surfboard wave beach snow skis bicycle motorcycle road traffic light clock").split()

COCO = [((640, 480), 40), ((480, 640), 10), ((640, 427), 14), ((427, 640), 6), ((500, 375), 8), ((375, 500), 4),
        ((640, 426), 6), ((612, 612), 3), ((640, 360), 4)]
VG = [((800, 600), 3), ((500, 333), 3), ((1024, 768), 2)]
BOOKS = [((300, 475), 3), ((333, 500), 2)]
SIZES = COCO + VG + BOOKS

# kind: (share, turns range, question words, answer words)
KINDS = {
    "vqa": (0.40, (1, 10), (5, 12), (1, 3)),
    "conv": (0.25, (1, 5), (8, 20), (25, 110)),
    "detail": (0.07, (1, 1), (6, 12), (80, 200)),
    "ocr": (0.12, (1, 5), (5, 10), (1, 6)),
    "region": (0.10, (2, 8), (8, 16), (3, 12)),
    "text": (0.06, (1, 5), (10, 60), (100, 380)),
}


def _words(rnd: random.Random, lo: int, hi: int) -> str:
    return " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(lo, hi)))


def _size(rnd: random.Random, kind: str) -> tuple[int, int]:
    table = BOOKS if kind == "ocr" else (VG if kind == "region" and rnd.random() < 0.5 else COCO)
    sizes, weights = zip(*table)
    return rnd.choices(sizes, weights)[0]


def record(rnd: random.Random, i: int, image_name=None, kinds=None) -> tuple[dict, tuple[int, int] | None]:
    """One sample; returns (LLaVA record, (width, height) of its image or None). `kinds`: a table like
    KINDS (the default), e.g. with turns and words scaled down."""
    table = kinds or KINDS
    names, shares = zip(*[(k, v[0]) for k, v in table.items()])
    kind = rnd.choices(names, shares)[0]
    _, (t_lo, t_hi), (q_lo, q_hi), (a_lo, a_hi) = table[kind]
    turns = rnd.randint(t_lo, t_hi)
    conv = []
    for t in range(turns):
        q = _words(rnd, q_lo, q_hi) + "?"
        if t == 0 and kind != "text":
            q = "<image>\n" + q
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": _words(rnd, a_lo, a_hi) + "."}]
    rec = {"id": f"{kind}-{i:06d}", "conversations": conv}
    size = None
    if kind != "text":
        size = _size(rnd, kind)
        rec["image"] = image_name(i, size) if image_name else f"coco/train2017/{i:012d}.jpg"
    return rec, size


def write_jpeg(path: Path, size: tuple[int, int], rnd: random.Random) -> None:
    """A real JPEG of `size` with smooth structure and noise (a few tens of kB, like a photo)."""
    import numpy as np
    from PIL import Image

    w, h = size
    g = np.random.default_rng(rnd.randrange(1 << 30))
    small = g.integers(0, 255, (max(h // 40, 2), max(w // 40, 2), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    noise = g.integers(-12, 12, (h, w, 3))
    arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=85)


def make_set(folder: Path, n: int, seed: int = 0) -> Path:
    """`n` samples with real JPEG files (one per image sample) under `folder`; returns the JSON path."""
    rnd = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rec, size = record(rnd, i, image_name=lambda i, s: f"images/{i:06d}.jpg")
        if size:
            write_jpeg(folder / rec["image"], size, rnd)
        rows.append(rec)
    path = folder / "mix.json"
    path.write_text(json.dumps(rows))
    return path


def real_geometry_processor(tokenizer_dir: str):
    """A LlavaNextProcessor at llava-v1.6's real geometry (336 px, patch 14, the 5 pinpoints) with the tiny
    checkpoint's tokenizer, so token and patch counts are those of the real models."""
    from transformers import AutoTokenizer, LlavaNextImageProcessor, LlavaNextProcessor

    s = 336
    ip = LlavaNextImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                 image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]],
                                 image_mean=[0.48145466, 0.4578275, 0.40821073],
                                 image_std=[0.26862954, 0.26130258, 0.27577711])
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14, num_additional_image_tokens=1,
                              vision_feature_select_strategy="default", image_token="<image>")
