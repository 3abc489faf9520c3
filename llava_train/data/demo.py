"""The bundled demo set: a synthetic visual instruction task whose answers need the image.

Each image shows one shape (circle, square or triangle) in one of six colours on a light background,
at one of several aspect ratios. Questions ask for the colour in several phrasings; a few samples are
multi-turn (colour, then the same answer as a sentence) and a few are text-only general questions.
The eval split holds unseen images with single colour questions: a model that ignores the image can
do no better than guessing one of six colours, so chance is 1/6 (about 17 %).

    python -m llava_train.data.demo data/demo      # regenerates data/demo (deterministic)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (40, 70, 215),
    "yellow": (235, 215, 40),
    "purple": (135, 50, 165),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES = [(28, 28), (42, 28), (28, 42), (56, 28), (28, 56), (56, 42), (35, 49), (63, 21)]  # (width, height)
QUESTIONS = [
    "What colour is the shape?",
    "What is the color of the object in the image?",
    "Which colour is the shape? Answer with one word.",
    "Name the colour of the shape.",
]
TEXT_ONLY = [
    ("What colour do you get by mixing blue and yellow?", "green"),
    ("What colour is a clear daytime sky?", "blue"),
    ("What colour is fresh grass?", "green"),
    ("What colour are ripe bananas?", "yellow"),
    ("Which colour means stop at a traffic light?", "red"),
]


def _jitter(rgb, rng: random.Random, amount: int = 18):
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def draw(colour: str, shape: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    bg = _jitter((235, 235, 235), rng, 15)
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    side = int(min(w, h) * rng.uniform(0.6, 0.9))
    x0 = rng.randint(0, w - side)
    y0 = rng.randint(0, h - side)
    fill = _jitter(COLOURS[colour], rng)
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(x0 + side // 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill=fill)
    return img


def _sample(i: int, split: str, out: Path, rng: random.Random, kind: str) -> dict:
    sid = f"{split}-{i:05d}"
    if kind == "text":
        q, a = TEXT_ONLY[rng.randrange(len(TEXT_ONLY))]
        return {"id": sid, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    size = rng.choice(SIZES)
    name = f"images/{sid}.png"
    draw(colour, shape, size, rng).save(out / name, optimize=True)
    q = rng.choice(QUESTIONS)
    conv = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": colour}]
    if kind == "multi":
        conv += [{"from": "human", "value": "Answer again in a full sentence."},
                 {"from": "gpt", "value": f"The {shape} is {colour}."}]
    return {"id": sid, "image": name, "question_type": "colour", "conversations": conv}


def generate(out: Path, n_train: int = 2000, n_eval: int = 150, seed: int = 0) -> None:
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train = []
    for i in range(n_train):
        r = rng.random()
        kind = "text" if r < 0.03 else "multi" if r < 0.08 else "single"
        train.append(_sample(i, "train", out, rng, kind))
    evals = [_sample(i, "eval", out, rng, "single") for i in range(n_eval)]
    (out / "train.json").write_text(json.dumps(train, indent=1) + "\n")
    (out / "eval.json").write_text(json.dumps(evals, indent=1) + "\n")


if __name__ == "__main__":
    generate(Path(sys.argv[1] if len(sys.argv) > 1 else "data/demo"))
