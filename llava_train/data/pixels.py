"""Pixel values of LLaVA-NeXT images: bit-identical to transformers' PIL image processor, ~2x faster.

Why our own: every training image goes through the image processor, in the training process when
training on the CPU (0 DataLoader workers) and in the workers on a GPU. transformers'
`LlavaNextImageProcessorPil` converts each of an image's 3-5 patches between numpy and PIL several
times, "resizes" patches that already have their size, and rescales and normalises in float64.
`python benchmarks/pixels.py` (one core, 336 px): 27 ms -> 12 ms for a 640x480 image, 1.7-5.7x over
common shapes (benchmarks/results/pixels.json); what is left is mostly the two PIL resizes.
`FastLlavaNextPixels` does only what decides the pixels:
- the same two PIL resizes (the grid's aspect-kept resize, then the squashed base image), with the
  processor's own resample filter and transformers' own grid choice (`select_best_resolution`,
  `get_patch_output_size`);
- the centred zero padding and the row-major patch split as numpy reshapes;
- rescale and normalise as one lookup per channel: the input is 8-bit, so every output value is one of
  3 x 256 float32 numbers, computed once with transformers' exact arithmetic (float64 rescale, float32
  cast, then (x - mean) / std in float32), so the result is bit-identical (tests/data/test_pixels.py
  compares `np.array_equal` over many sizes, shapes and both geometries).

It is used only where it is exact: the PIL backend with the standard LLaVA-NeXT settings (resize to the
shortest edge = the square crop, centre crop, rescale, normalise, RGB; every pinpoint a multiple of the
crop). Anything else (the torchvision backend `LlavaNextImageProcessor`, whose pixels differ slightly
from PIL's, other settings, other processor classes) goes through the processor itself, as does
`data.fast_pixels=false`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

PixelFn = Callable[[list[Image.Image]], list[np.ndarray]]


class ProcessorPixels:
    """The image processor itself: one (patches, C, H, W) array per image (no padding across images)."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, images: list[Image.Image]) -> list[np.ndarray]:
        return list(self.image_processor(images=images, do_pad=False)["pixel_values"])


class FastLlavaNextPixels:
    """`LlavaNextImageProcessorPil(images=..., do_pad=False)["pixel_values"]`, exactly (see the module
    docstring): RGB images by this path, others by the processor; build it with `pixel_fn`, which checks
    that it applies."""

    def __init__(self, image_processor):
        ip = image_processor
        self.processor = ProcessorPixels(ip)  # for images not plain RGB yet (load_rgb's always are)
        self.side = int(ip.crop_size["height"])
        self.pinpoints = [list(map(int, p)) for p in ip.image_grid_pinpoints]
        self.resample = ip.resample
        values = np.arange(256, dtype=np.uint8)
        rescaled = (values.astype(np.float64) * ip.rescale_factor).astype(np.float32)  # transformers' rescale
        mean, std = np.asarray(ip.image_mean, np.float32), np.asarray(ip.image_std, np.float32)
        self.lut = ((rescaled[None, :] - mean[:, None]) / std[:, None]).astype(np.float32)  # [3, 256]

    def __call__(self, images: list[Image.Image]) -> list[np.ndarray]:
        return [self.one(img) for img in images]

    def one(self, img: Image.Image) -> np.ndarray:
        from transformers.image_processing_utils import get_patch_output_size, select_best_resolution

        if img.mode != "RGB" or img.info.get("transparency") is not None:
            return self.processor([img])[0]  # the processor's own conversion (transparency onto white...)
        w, h = img.size
        p = self.side
        grid_h, grid_w = select_best_resolution((h, w), self.pinpoints)
        # get_patch_output_size reads only the shape of its (channels-first) image argument
        new_h, new_w = get_patch_output_size(np.broadcast_to(np.uint8(0), (3, h, w)), (grid_h, grid_w),
                                             input_data_format="channels_first")
        canvas = np.zeros((grid_h, grid_w, 3), np.uint8)
        top, left = (grid_h - new_h) // 2, (grid_w - new_w) // 2
        canvas[top: top + new_h, left: left + new_w] = np.asarray(img.resize((new_w, new_h), resample=self.resample))
        base = np.asarray(img.resize((p, p), resample=self.resample))
        n_h, n_w = grid_h // p, grid_w // p
        tiles = canvas.reshape(n_h, p, n_w, p, 3).transpose(0, 2, 4, 1, 3)  # (row, col, C, p, p), row-major
        out = np.empty((1 + n_h * n_w, 3, p, p), np.float32)
        for c in range(3):
            # every index is 0..255 (uint8): mode="clip" never clips, and writes into `out` unbuffered
            np.take(self.lut[c], base[:, :, c], out=out[0, c], mode="clip")
            np.take(self.lut[c], tiles[:, :, c].reshape(-1, p, p), out=out[1:, c], mode="clip")
        return out


def fast_path_problems(image_processor) -> list[str]:
    """Why `FastLlavaNextPixels` would not equal this processor's output (empty: it does)."""
    from transformers.image_utils import PILImageResampling

    ip = image_processor
    if type(ip).__name__ != "LlavaNextImageProcessorPil":
        return [f"the image processor is {type(ip).__name__}, not LlavaNextImageProcessorPil"]
    problems = []
    for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
        if not getattr(ip, flag, False):
            problems.append(f"{flag}=False")
    size, crop = _as_dict(ip.size), _as_dict(ip.crop_size)
    side = size.get("shortest_edge")
    if side is None or set(k for k, v in size.items() if v is not None) != {"shortest_edge"}:
        problems.append(f"size={size} is not a single shortest_edge")
    elif {crop.get("height"), crop.get("width")} != {side}:
        problems.append(f"crop_size={crop} is not shortest_edge x shortest_edge")
    elif any(int(v) % int(side) for pin in ip.image_grid_pinpoints for v in pin):
        problems.append(f"a grid pinpoint is not a multiple of {side}")
    if len(np.atleast_1d(ip.image_mean)) != 3 or len(np.atleast_1d(ip.image_std)) != 3:
        problems.append("image_mean/image_std are not per RGB channel")
    try:
        PILImageResampling(ip.resample)
    except ValueError:
        problems.append(f"resample={ip.resample!r} is not a PIL filter")
    return problems


def pixel_fn(image_processor, fast: bool = True) -> PixelFn:
    """images -> pixel values per image: `FastLlavaNextPixels` where it is exact and `fast`, else the
    processor itself."""
    if fast:
        problems = fast_path_problems(image_processor)
        if not problems:
            log.info("pixels: llava-train's fast path, bit-identical to LlavaNextImageProcessorPil")
            return FastLlavaNextPixels(image_processor)
        log.info("pixels: the image processor itself (%s)", "; ".join(problems))
    return ProcessorPixels(image_processor)


def _as_dict(size: Any) -> dict:
    if size is None:
        return {}
    if isinstance(size, dict):
        return dict(size)
    return {k: getattr(size, k) for k in ("shortest_edge", "longest_edge", "height", "width") if hasattr(size, k)}
