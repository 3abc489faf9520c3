"""data/pixels.py: llava-train's pixel path gives exactly the PIL image processor's values (bit for bit), for
the real checkpoints' processor config and the tiny one, and is used only where it is exact."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DEMO
from llava_train.config import DataConfig
from llava_train.data.dataset import ConversationDataset
from llava_train.data.pixels import FastLlavaNextPixels, ProcessorPixels, fast_path_problems, pixel_fn

# llava-hf/llava-v1.6-mistral-7b-hf's preprocessor_config.json (the same in the vicuna, 34b, llama3-8b, 72b and
# 110b llava-next checkpoints)
HUB_PREPROCESSOR = {
    "aspect_ratio_setting": "anyres", "crop_size": {"height": 336, "width": 336}, "do_center_crop": True,
    "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "LlavaNextImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "LlavaNextProcessor", "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336},
}
# (width, height): landscape / portrait / square, each grid, extreme aspects, tiny, huge, odd sizes, exact fits
SIZES = [(640, 480), (480, 640), (336, 336), (1000, 300), (200, 900), (1024, 768), (672, 672), (1008, 336),
         (50, 40), (1, 1), (3, 700), (700, 3), (337, 335), (2000, 1500), (641, 479)]


@pytest.fixture(scope="module")
def hub_processor(tmp_path_factory):
    """The real checkpoints' image processor as AutoImageProcessor loads it here (no torchvision: PIL)."""
    from transformers import AutoImageProcessor

    folder = tmp_path_factory.mktemp("hub-preprocessor")
    (folder / "preprocessor_config.json").write_text(json.dumps(HUB_PREPROCESSOR))
    return AutoImageProcessor.from_pretrained(str(folder))


def _image(w: int, h: int, seed: int, kind: str = "jpeg") -> Image.Image:
    """A decoded photo-like image: smooth gradients plus noise, through a real JPEG/PNG round trip."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], axis=-1)
    arr = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG" if kind == "jpeg" else "PNG", quality=90)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _reference(ip, images):
    return ip(images=images, do_pad=False)["pixel_values"]


def test_real_geometry_pixels_are_bit_identical(hub_processor):
    if type(hub_processor).__name__ != "LlavaNextImageProcessorPil":
        pytest.skip("torchvision is installed: the checkpoint loads the torchvision backend (tested below)")
    fast = pixel_fn(hub_processor)
    assert isinstance(fast, FastLlavaNextPixels)
    for k, (w, h) in enumerate(SIZES):
        img = _image(w, h, seed=k, kind="png" if k % 3 == 0 else "jpeg")
        want, got = _reference(hub_processor, [img])[0], fast([img])[0]
        assert got.dtype == want.dtype == np.float32
        assert got.shape == want.shape, (w, h)
        assert np.array_equal(got, want), (w, h)


def test_several_images_and_other_modes(hub_processor, processor):
    # one call with several images (a multi-image sample), the tiny checkpoint's geometry too, and images
    # that are not RGB yet (the processor converts them; load_rgb normally has)
    for ip in (hub_processor, processor.image_processor):
        if type(ip).__name__ != "LlavaNextImageProcessorPil":
            continue  # torchvision installed: nothing to compare
        assert fast_path_problems(ip) == []
        images = [_image(500, 375, 1), _image(120, 900, 2).convert("L"), _image(64, 48, 3).convert("RGBA")]
        want, got = _reference(ip, images), pixel_fn(ip)(images)
        assert len(got) == len(want) == 3
        for a, b in zip(got, want):
            assert np.array_equal(a, b)


def test_transparent_images_train_on_the_pixels_inference_sees(tmp_path, hub_processor):
    # inference passes the file's image to the processor, which composites transparency onto white; training
    # loads it through load_rgb first: the pixel values must be the same (not the colours under the alpha)
    from llava_train.data.formats import Conversation
    from llava_train.data.images import load_rgb

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (90, 120, 4), dtype=np.uint8)
    rgba[:, :60, 3] = 0  # half fully transparent, over random colours
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    pal = Image.fromarray(rng.integers(0, 8, (64, 64), dtype=np.uint8), "P")
    pal.putpalette([v for k in range(8) for v in (k * 30, 0, 255 - k * 30)])
    pal.save(tmp_path / "pal.png", transparency=3)  # palette index 3 transparent
    Image.fromarray(rgba[..., [0, 3]], "LA").save(tmp_path / "grey_alpha.png")
    keyed = rgba[..., :3].copy()
    keyed[:20] = (1, 2, 3)
    Image.fromarray(keyed, "RGB").save(tmp_path / "keyed.png", transparency=(1, 2, 3))  # RGB + a colour key
    conv = Conversation(id="t", turns=[], images=[], source="test", index=0)
    fast = pixel_fn(hub_processor)
    for name in ("alpha.png", "pal.png", "grey_alpha.png", "keyed.png"):
        raw = Image.open(tmp_path / name)
        inference = _reference(hub_processor, [raw])[0]
        trained = fast([load_rgb(name, tmp_path, conv, 0)])[0]
        assert np.array_equal(trained, inference), name
        assert np.array_equal(fast([raw])[0], inference), name  # a non-RGB image goes to the processor itself


def test_fast_path_only_where_exact(hub_processor):
    from transformers import LlavaNextImageProcessorPil

    assert isinstance(pixel_fn(hub_processor, fast=False), ProcessorPixels)
    changed = {"do_normalize": False, "do_center_crop": False, "crop_size": {"height": 300, "width": 336},
               "size": {"height": 336, "width": 336}, "image_mean": 0.5}
    for key, value in changed.items():
        ip = LlavaNextImageProcessorPil(**{**{k: v for k, v in HUB_PREPROCESSOR.items()
                                              if k not in ("image_processor_type", "processor_class",
                                                           "aspect_ratio_setting")}, key: value})
        problems = fast_path_problems(ip)
        assert problems, key
        fn = pixel_fn(ip)
        assert isinstance(fn, ProcessorPixels), key
        img = _image(300, 200, 0)
        assert np.array_equal(fn([img])[0], _reference(ip, [img])[0])  # the processor's own output

    class OtherProcessor(LlavaNextImageProcessorPil):
        pass

    assert "not LlavaNextImageProcessorPil" in fast_path_problems(OtherProcessor())[0]


def test_training_items_equal_with_and_without_the_fast_path(processor, encoder):
    path = str(DEMO / "train.json")
    items = {}
    for fast in (True, False):
        cfg = DataConfig(train_path=path, fast_pixels=fast)
        ds = ConversationDataset(path, cfg, encoder, processor.image_processor)
        assert isinstance(ds.pixels, FastLlavaNextPixels if fast else ProcessorPixels)
        items[fast] = [ds[i] for i in range(12)]
    with_images = 0
    for a, b in zip(items[True], items[False]):
        assert a.keys() == b.keys()
        for pa, pb in zip(a.get("pixel_values", []), b.get("pixel_values", [])):
            assert torch.equal(pa, pb)
            with_images += 1
    assert with_images >= 6
