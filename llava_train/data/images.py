"""Images: resolving references, reading sizes from headers, loading pixels, counting image tokens.

The number of `<image>` tokens LLaVA-NeXT needs depends only on the image size and the checkpoint's
geometry, so it is computed from the file header without decoding pixels (`num_image_tokens`).
"""

from __future__ import annotations

import io
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from llava_train.data.formats import Conversation, DataError, ImageRef

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

# The only formats images are opened as, with the file extensions that name them. PIL would otherwise
# try every plugin it has (EPS runs Ghostscript, where installed, on a file merely named `.png`).
FORMAT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "PNG": (".png",),
    "WEBP": (".webp",),
    "GIF": (".gif",),
    "BMP": (".bmp", ".dib"),
    "TIFF": (".tif", ".tiff"),
}
ALLOWED_FORMATS = tuple(FORMAT_EXTENSIONS)
_BY_EXTENSION = {ext: fmt for fmt, exts in FORMAT_EXTENSIONS.items() for ext in exts}


def _formats_for(name: str, conv: Conversation, fld: str) -> tuple[str, ...]:
    """The formats a file called `name` may be opened as: the one its extension names (content and
    extension must agree); any allowed format when it has no extension; refused for other extensions."""
    ext = Path(name).suffix.lower()
    if not ext:
        return ALLOWED_FORMATS
    if ext not in _BY_EXTENSION:
        raise conv.error(f"image {name!r} has extension {ext!r}, not one of the allowed image formats "
                         f"({', '.join(ALLOWED_FORMATS)}); convert it", field=fld, kind="bad_image_format")
    return (_BY_EXTENSION[ext],)


_MAGIC = {"JPEG": (b"\xff\xd8\xff",), "PNG": (b"\x89PNG\r\n\x1a\n",), "GIF": (b"GIF87a", b"GIF89a"),
          "BMP": (b"BM",), "TIFF": (b"II*\x00", b"MM\x00*"), "WEBP": (b"RIFF",)}


def _looks_like(head: bytes, formats: tuple[str, ...]) -> bool:
    return any(head.startswith(m) and (f != "WEBP" or head[8:12] == b"WEBP") for f in formats for m in _MAGIC[f])


def _open_as(fp, formats: tuple[str, ...], name: str, conv: Conversation, fld: str) -> Image.Image:
    try:
        return Image.open(fp, formats=list(formats))
    except UnidentifiedImageError:
        if isinstance(fp, str):
            with open(fp, "rb") as f:
                head = f.read(16)
        else:
            fp.seek(0)
            head = fp.read(16)
        if _looks_like(head, formats):  # the right signature, broken after it
            fmt = formats[0] if len(formats) == 1 else "image"
            raise conv.error(f"unreadable or corrupt image ({name or 'bytes'}: a broken {fmt} header); "
                             "re-encode or remove it", field=fld, kind="corrupt_image") from None
        what = f"a {formats[0]} image as its extension says" if len(formats) == 1 else \
            f"an image in an allowed format ({', '.join(ALLOWED_FORMATS)})"
        raise conv.error(f"{name or 'the image bytes'} is not {what}; re-encode it or fix the name",
                         field=fld, kind="bad_image_format") from None


def _open(ref: ImageRef, image_root: Path, conv: Conversation, position: int) -> Image.Image:
    fld = f"image[{position}]"
    try:
        if isinstance(ref, dict) and (ref.get("bytes") or ref.get("path")):  # datasets.Image value
            data, name = ref.get("bytes"), ref.get("path") or ""
            if data:
                formats = _formats_for(name, conv, fld) if name else ALLOWED_FORMATS
                return _open_as(io.BytesIO(data), formats, name, conv, fld)
            ref = name
        if isinstance(ref, (bytes, bytearray, memoryview)):
            return _open_as(io.BytesIO(ref), ALLOWED_FORMATS, "", conv, fld)
        if isinstance(ref, Image.Image):
            return ref
        if not isinstance(ref, str):
            raise conv.error(f"image reference must be a path string, bytes or a {{bytes, path}} object, got "
                             f"{type(ref).__name__} ({ref!r:.40})", field=fld, kind="bad_image_ref")
        path = resolve_path(ref, image_root, conv, position)
        try:
            st = os.stat(path)  # before any open: a FIFO or device would block or stream forever
        except FileNotFoundError:
            raise conv.error(f"image file {path} not found; check data.image_root "
                             f"(relative paths resolve against it)", field=fld, kind="missing_image") from None
        if not stat.S_ISREG(st.st_mode):
            raise conv.error(f"image path {path} is not a regular file (a folder, FIFO, device or socket); "
                             "point it at an image file", field=fld, kind="not_a_file")
        return _open_as(str(path), _formats_for(path.name, conv, fld), str(path), conv, fld)
    except Image.DecompressionBombError as exc:
        raise conv.error(f"{exc}; downscale it", field=fld, kind="image_too_large") from None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
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


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB with the image's real range scaled to 0..255. PIL's own `convert("RGB")` clips 16-bit
    and 32-bit integer images at 255 (a 16-bit PNG becomes nearly two grey levels) and casts floats
    without scaling (a 0..1 float TIFF becomes black). Integer images: 16-bit range scaled down by 257
    (values <= 255 throughout are taken as 8-bit). Float images: 0..1 scaled by 255, 0..255 kept,
    larger ranges treated as 16-bit; NaN is 0. Transparency (an alpha band, a palette's transparent
    colour) is composited onto white, as transformers' image processors do at inference
    (`image_transforms.convert_to_rgb`): `convert("RGB")` would drop it and train on the colours hidden
    under it (often black), which the model never sees when prompted."""
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        top = float(a.max()) if a.size else 0.0
        if img.mode == "F" and top <= 1.0:
            a = a * 255.0
        elif top > 255.0:
            a = a / 257.0
        grey = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def load_rgb(ref: ImageRef, image_root: Path, conv: Conversation, position: int) -> Image.Image:
    """Decoded RGB pixels (palette, grey, RGBA, CMYK, 16-bit and float images converted). Every pixel is
    decoded here, so cut or corrupt pixel data fails here as a `DataError` naming the sample."""
    fld = f"image[{position}]"
    img = _open(ref, image_root, conv, position)
    try:
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise conv.error("image over the decompression bomb limit", field=fld, kind="image_too_large")
        img.load()
        return to_rgb(img)
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise conv.error(f"corrupt or truncated pixel data ({exc}); re-encode or remove it", field=fld,
                         kind="corrupt_image") from None
