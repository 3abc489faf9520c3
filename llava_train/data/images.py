"""Images: resolving references, reading sizes from headers, loading pixels, counting image tokens.

The number of `<image>` tokens LLaVA-NeXT needs depends only on the image size and the checkpoint's
geometry, so it is computed from the file header without decoding pixels (`num_image_tokens`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from llava_train.data.formats import Conversation, ImageRef

# Larger images are refused (PIL's own bomb limit is a warning below 2x this).
MAX_IMAGE_PIXELS = 64_000_000

@dataclass(frozen=True)
class ImageGeometry:
    """What decides the feature count of an image (read from a LlavaNext processor)."""

    image_size: int  # the processor's base resolution (336 for the real checkpoints)
    patch_size: int  # vision tower patch (14)
    grid_pinpoints: tuple[tuple[int, int], ...]
    num_additional_image_tokens: int = 1  # CLIP's CLS
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it

    @classmethod
    def from_processor(cls, processor) -> "ImageGeometry":
        ip = processor.image_processor
        size = ip.size
        side = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
        if side is None:
            side = min(size["height"], size["width"]) if isinstance(size, dict) else min(size.height, size.width)
        return cls(
            image_size=int(side),
            patch_size=int(processor.patch_size),
            grid_pinpoints=tuple(tuple(int(v) for v in p) for p in ip.image_grid_pinpoints),
            num_additional_image_tokens=int(processor.num_additional_image_tokens),
            vision_feature_select_strategy=processor.vision_feature_select_strategy,
        )

def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """LLaVA-NeXT's choice of grid: most effective resolution, then least waste (as in transformers)."""
    best, best_eff, best_waste = None, -1, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        dw, dh = int(width * scale), int(height * scale)
        eff = min(dw * dh, width * height)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best

def num_image_tokens(height: int, width: int, geo: ImageGeometry) -> int:
    """Features LlavaNext produces for an image of this size (= `<image>` tokens after expansion)."""
    side = geo.image_size
    best_h, best_w = select_best_resolution(height, width, geo.grid_pinpoints)
    scale_h, scale_w = best_h // side, best_w // side
    patches = side // geo.patch_size
    cur_h, cur_w = patches * scale_h, patches * scale_w
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= ((cur_h - new_h) // 2) * 2
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= ((cur_w - new_w) // 2) * 2
    unpadded = cur_h * cur_w + cur_h  # grid features plus one newline per row
    base = patches * patches + geo.num_additional_image_tokens
    if geo.vision_feature_select_strategy == "default":
        base -= 1
    return unpadded + base

def num_patches(height: int, width: int, geo: ImageGeometry) -> int:
    """Pixel patches (base + grid crops) this image needs before any padding."""
    best_h, best_w = select_best_resolution(height, width, geo.grid_pinpoints)
    return (best_h // geo.image_size) * (best_w // geo.image_size) + 1

def resolve_path(ref: str, image_root: Path, conv: Conversation, position: int) -> Path:
    """Relative paths resolve against `image_root` and may not escape it; absolute paths are taken as is."""
    p = Path(ref)
    if p.is_absolute():
        return p
    root = image_root.resolve()
    full = (root / p).resolve()
    if root != full and root not in full.parents:
        raise conv.error(f"image path {ref!r} escapes data.image_root ({root}); use a path inside it "
                         "or an absolute path", field=f"image[{position}]", kind="path_escape")
    return full

def resolve_ref(ref: ImageRef, image_root: Path, conv: Conversation, position: int) -> ImageRef:
    """A relative path resolved against `image_root` (checked not to escape it), as an absolute path
    string; bytes and `datasets.Image` values with bytes are returned as they are."""
    if isinstance(ref, dict) and not ref.get("bytes") and ref.get("path"):
        ref = ref["path"]
    if isinstance(ref, str):
        return str(resolve_path(ref, image_root, conv, position))
    return ref

def _open(ref: ImageRef, image_root: Path, conv: Conversation, position: int) -> Image.Image:
    fld = f"image[{position}]"
    try:
        if isinstance(ref, (bytes, bytearray)):
            return Image.open(io.BytesIO(ref))
        if isinstance(ref, dict) and (ref.get("bytes") or ref.get("path")):  # datasets.Image feature
            return _open(ref.get("bytes") or ref["path"], image_root, conv, position)
        if isinstance(ref, Image.Image):
            return ref
        if not isinstance(ref, str):
            raise conv.error(f"image reference must be a path or bytes, got {type(ref).__name__}", field=fld)
        path = resolve_path(ref, image_root, conv, position)
        if not path.exists():
            raise conv.error(f"image file {path} not found; check data.image_root "
                             f"(relative paths resolve against it)", field=fld, kind="missing_image")
        return Image.open(path)
    except Image.DecompressionBombError as exc:
        raise conv.error(f"{exc}; downscale it", field=fld, kind="image_too_large") from None
    except (OSError, SyntaxError) as exc:
        raise conv.error(f"unreadable or corrupt image ({exc}); re-encode or remove it", field=fld,
                         kind="corrupt_image") from None

def image_size(ref: ImageRef, image_root: Path, conv: Conversation, position: int) -> tuple[int, int]:
    """(height, width) from the header only."""
    with _open(ref, image_root, conv, position) as img:
        w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        raise conv.error(f"image is {w}x{h} = {w * h} pixels, over the {MAX_IMAGE_PIXELS} limit "
                         "(decompression bomb guard); downscale it", field=f"image[{position}]",
                         kind="image_too_large")
    if w < 1 or h < 1:
        raise conv.error(f"image has an empty size {w}x{h}", field=f"image[{position}]", kind="corrupt_image")
    return h, w

def load_rgb(ref: ImageRef, image_root: Path, conv: Conversation, position: int) -> Image.Image:
    """Decoded RGB pixels (palette, grey, RGBA, CMYK... converted)."""
    img = _open(ref, image_root, conv, position)
    try:
        img.load()
    except (OSError, SyntaxError) as exc:
        raise conv.error(f"unreadable or corrupt image ({exc}); re-encode or remove it",
                         field=f"image[{position}]", kind="corrupt_image") from None
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise conv.error("image over the decompression bomb limit", field=f"image[{position}]",
                         kind="image_too_large")
    return img.convert("RGB") if img.mode != "RGB" else img
