"""Each image's (height, width) from its header, for the length plan: read once at start, without decoding.

Length grouping is only as good as the lengths it sorts. At llava-v1.6's geometry one image is 1,900 to
2,928 tokens depending on its shape (576 base tokens + the grid crops, unpadded to the image's aspect
ratio), so counting every image at one assumed size (`data.image_sizes=assumed`, `data.lazy_image_hw`)
groups samples whose image tokens differ by up to 50 %: on the LLaVA-mix-shaped set of
`benchmarks/data_pipeline.py` (336 px, batch 8) the grouped batches were 89.6 % real tokens with the
assumed size, 98.4 % with header sizes and 99.2 % with exact lengths; random batches 82.3 %.

JSON/JSONL sources (`header_sizes`): the image files, in parallel record ranges on the rank's cores; the
caller caches the result next to the data file. Arrow sources (`arrow_sizes`): the embedded bytes' first
KB read in place from the memory-mapped buffers, paths as files.

Why our own header reader: `PIL.Image.open` costs ~43 us per JPEG (plugin set-up, file object) and the
whole path a sample takes at fetch (`json.loads`, `to_conversation`, `Path.resolve`, PIL) ~140 us per
record: 8 CPU-minutes for 3.5M records. Here a LLaVA record's image path is taken from its bytes with one
regular expression and a JPEG's SOF marker / a PNG's IHDR chunk is parsed from the file's first 4 KB
(64 KB when EXIF/ICC data comes first): 10-14 us per record on one core of this project's machine (warm
page cache; `benchmarks/scale.py`: ~25 s for 3.3M records on 2 cores). Anything else (other formats,
several images, `..` out of the root, a file whose content is not the format its extension names, a
header this reader does not understand) takes the fetch path's own functions, so sizes equal what
`dataset.resolve_and_size` says (`tests/data/test_imagesizes.py` compares them with PIL's). Sizes are only the
estimates' inputs: an image that cannot be read here is counted at the assumed size, named in one
warning, and fails (or is skipped) when its sample is fetched, as before.

Paths are joined and normalised as strings (no symlink resolution: only a header is read, and the fetch
path still refuses anything outside `data.image_root`); non-regular files (FIFOs, devices) are never opened.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import stat
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from llava_train.data.dataset import resolve_and_size
from llava_train.data.formats import DataError, parse_line, to_conversation
from llava_train.data.images import ImageGeometry, num_image_tokens

log = logging.getLogger(__name__)

TASK_RECORDS = 32_768  # records per parallel task (fewer image records are sized in-process)
HEAD_BYTES = 65_536  # a JPEG's SOF marker comes after its EXIF/ICC segments, within the first 64 KB in practice
_IMAGE_KEY = re.compile(rb'"image"\s*:\s*"([^"\\]*)"')
# what a file's first bytes must be for its extension (`images._formats_for`; no extension: any format)
_SIGNATURES = {**dict.fromkeys((".jpg", ".jpeg", ".jpe", ".jfif"), b"\xff\xd8"), ".png": b"\x89PNG", "": b""}
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (DHT, JPG, DAC are not)


def jpeg_or_png_hw(head: bytes) -> Optional[tuple[int, int]]:
    """(height, width) from the first bytes of a JPEG (its first SOF marker, as PIL reads it) or PNG (IHDR);
    None for anything else or anything not understood."""
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR" and len(head) >= 24:
        w, h = struct.unpack(">II", head[16:24])
        return h, w
    if not head.startswith(b"\xff\xd8"):
        return None
    i, n = 2, len(head)
    while i + 4 <= n:
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        seg = struct.unpack(">H", head[i + 2: i + 4])[0]
        if marker in _SOF:
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", head[i + 5: i + 9])
            return (h, w) if h and w else None
        if marker in (0xD9, 0xDA) or seg < 2:  # end of image / start of scan before any frame header
            return None
        i += 2 + seg
    return None


def _fast_hw(raw: bytes, root: str) -> Optional[tuple[int, int] | str]:
    """The size of a LLaVA record's single plain image path (JPEG or PNG); the path if that file does not
    exist; None for anything else (take the full path). `root`: absolute, normalised, ending in a separator."""
    found = _IMAGE_KEY.findall(raw)
    if len(found) != 1 or b'"images"' in raw:
        return None
    try:
        return _file_hw(found[0].decode(), root)
    except UnicodeDecodeError:
        return None


def _file_hw(ref: str, root: str) -> Optional[tuple[int, int] | str]:
    """The size of image file `ref` (relative to `root`) if it is a JPEG or PNG; its path if it does not exist."""
    if ref.startswith("/"):
        full = os.path.normpath(ref)
    elif "/." in "/" + ref or "//" in ref:  # `..`, `.` or empty segments: normalise, then check the root
        full = os.path.normpath(root + ref)
        if not full.startswith(root):
            return None  # escapes the root: the full path raises the error it owes
    else:
        full = root + ref
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer; only regular files are read
        fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return full
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = os.read(fd, 4096)  # enough for most JPEGs; EXIF/ICC segments may push the frame header further
        signature = _SIGNATURES.get(os.path.splitext(ref)[1].lower())
        if signature is None or not head.startswith(signature):
            return None  # another format, or not the one its extension names: the fetch path's rules decide
        hw = jpeg_or_png_hw(head)
        if hw is None and len(head) == 4096:
            hw = jpeg_or_png_hw(head + os.read(fd, HEAD_BYTES - 4096))
        return hw
    except OSError:
        return None
    finally:
        os.close(fd)


def _full_hw(raw: bytes, path: Path, index: int, fmt: str, root: Path) -> list[tuple[int, int]]:
    """Image sizes the way a fetch reads them (`dataset.prepare`): raises `DataError` naming the sample."""
    row = parse_line(raw, path, index)
    if isinstance(row, DataError):
        raise row
    return resolve_and_size(to_conversation(row, fmt=fmt, source=str(path), index=index), root)


def _size_records(path: str, offsets: np.ndarray, sizes: np.ndarray, ids: np.ndarray, fmt: str,
                  root: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per record of `ids` (at `offsets`, `sizes` bytes long): its image count (-1: not sized); the flat
    (h, w) list; up to 3 failure reasons."""
    counts = np.full(len(ids), -1, dtype=np.int32)
    hw: list[int] = []
    failures: list[str] = []
    root_path, file_path = Path(root), Path(path)
    root = os.path.join(os.path.normpath(root), "")
    with open(path, "rb") as f:
        for k, i in enumerate(ids):
            f.seek(int(offsets[k]))
            raw = f.read(int(sizes[k]))
            one = _fast_hw(raw, root) if fmt in ("auto", "llava") else None
            if isinstance(one, str):  # counted at the assumed size; the fetch raises (or skips) with the details
                if len(failures) < 3:
                    failures.append(f"sample #{i}: image file {one} not found")
                continue
            if one is not None:
                counts[k] = 1
                hw += one
                continue
            try:
                found = _full_hw(raw, file_path, int(i), fmt, root_path)
            except DataError as err:
                if len(failures) < 3:
                    failures.append(str(err))
                continue
            counts[k] = len(found)
            hw += [v for pair in found for v in pair]
    return counts, np.asarray(hw, dtype=np.int32), failures


def header_sizes(path: Path, offsets: np.ndarray, sizes: np.ndarray, with_images: np.ndarray, *, fmt: str,
                 image_root: Path, processes: Optional[int] = None) -> dict[str, np.ndarray]:
    """Image sizes of the records `with_images` (indices) of a JSON/JSONL file: `counts` (images per record,
    -1 where they could not be read), `hw` (flat (h, w) pairs in record order) and `failed` (records not sized).
    Parallel over the rank's cores in record ranges (fork: the children only need this module)."""
    ids = np.asarray(with_images, dtype=np.int64)
    image_root = Path(os.path.abspath(image_root))
    tasks = [(str(path), offsets[chunk], sizes[chunk], chunk, fmt, str(image_root))
             for chunk in (ids[k: k + TASK_RECORDS] for k in range(0, len(ids), TASK_RECORDS))]
    if processes is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        processes = min(cores, 16)
    processes = max(1, min(processes, len(tasks)))
    if processes == 1:
        parts = [_size_records(*t) for t in tasks]
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            parts = pool.starmap(_size_records, tasks, chunksize=1)
    counts = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
    hw = np.concatenate([p[1] for p in parts] + [np.zeros(0, np.int32)]).reshape(-1, 2)
    failures = [f for p in parts for f in p[2]]
    n_failed = int((counts < 0).sum())
    if n_failed:
        log.warning("%d of %d samples with images in %s: image size not readable at start, counted as "
                    "data.lazy_image_hw for the length plan (they fail or are skipped when fetched), e.g. %s",
                    n_failed, len(ids), path, "; ".join(failures[:3]))
    return {"ids": ids, "counts": counts, "hw": hw}


def image_tokens(found: dict[str, np.ndarray], n_records: int, geo: ImageGeometry) -> np.ndarray:
    """Per record: the image tokens of its sized images (0 for records without images); -1 where the sizes
    could not be read. One `num_image_tokens` call per distinct size."""
    out = np.zeros(n_records, dtype=np.int64)
    counts, hw = found["counts"], found["hw"]
    out[found["ids"][counts < 0]] = -1
    if len(hw):  # distinct sizes as one int64 key each (np.unique over rows is ~20x slower)
        keys, inverse = np.unique(hw[:, 0].astype(np.int64) << 32 | hw[:, 1], return_inverse=True)
        per = np.asarray([num_image_tokens(int(k >> 32), int(k & 0xFFFFFFFF), geo) for k in keys], dtype=np.int64)
        owner = np.repeat(found["ids"][counts > 0], counts[counts > 0])
        out += np.bincount(owner, weights=per[inverse.reshape(-1)], minlength=n_records).astype(np.int64)
    return out


def arrow_sizes(ds, *, fmt: str, image_root: Path, source: str, batch: int = 65_536) -> dict[str, np.ndarray]:
    """`header_sizes` for an HF `datasets.Dataset` (image columns undecoded: {bytes, path} structs, bytes or
    path strings, or lists of them). Embedded bytes are read in place from the memory-mapped Arrow buffers
    (a JPEG's or PNG's first 4 KB, copied; nothing else of the image is touched); paths as files; anything
    else through the fetch path's functions on the row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = "image" if "conversations" in ds.column_names else "images"
    n = len(ds)
    counts = np.zeros(n, dtype=np.int32)
    if col not in ds.column_names:
        return {"ids": np.arange(n), "counts": counts, "hw": np.zeros((0, 2), np.int32)}
    root = os.path.join(os.path.abspath(image_root), "")
    hw = np.zeros((0, 2), np.int32)
    parts, failures = [], []
    table = ds.select_columns([col]).with_format("arrow")
    for start in range(0, n, batch):
        base = start
        for arr in table[start: start + batch].column(0).chunks:  # chunk by chunk: no 2 GB offset overflow
            if not len(arr):
                continue
            rows = np.arange(base, base + len(arr))
            if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
                owner = rows[pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)]
                arr = pc.list_flatten(arr)
            else:
                owner = rows
            if pa.types.is_struct(arr.type):
                data, paths = arr.field("bytes"), arr.field("path")
                present = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False))
            else:
                data = arr if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type) else None
                paths = arr if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) else None
                present = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False))
            owner = owner[present]
            found = np.full((len(present), 2), -1, dtype=np.int32)
            if data is not None:
                buffers = data.buffers()
                width = np.int64 if pa.types.is_large_binary(data.type) else np.int32
                offsets = np.frombuffer(buffers[1], dtype=width)[data.offset: data.offset + len(data) + 1]
                blob = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
                has = ~np.asarray(data.is_null().to_numpy(zero_copy_only=False))
                for k in np.flatnonzero(has & present):
                    lo, hi = int(offsets[k]), int(offsets[k + 1])
                    one = jpeg_or_png_hw(blob[lo: min(hi, lo + 4096)].tobytes())
                    if one is None and hi - lo > 4096:
                        one = jpeg_or_png_hw(blob[lo: min(hi, lo + HEAD_BYTES)].tobytes())
                    if one is not None:
                        found[k] = one
            if paths is not None:
                names = paths.to_pylist()
                for k in np.flatnonzero(present & (found[:, 0] < 0)):
                    if names[k] and (data is None or not data[int(k)].is_valid):
                        one = _file_hw(names[k], root)
                        if isinstance(one, tuple):
                            found[k] = one
            found = found[present]
            per_row = np.bincount(owner - base, minlength=len(rows)).astype(np.int32)
            unsized = np.zeros(len(rows), dtype=bool)
            unsized[owner[found[:, 0] < 0] - base] = True
            for r in np.flatnonzero(unsized):  # the fetch path, on the whole row
                try:
                    conv = to_conversation(ds[int(rows[r])], fmt=fmt, source=source, index=int(rows[r]))
                    sizes = resolve_and_size(conv, image_root)
                except DataError as err:
                    if len(failures) < 3:
                        failures.append(str(err))
                    per_row[r] = -1
                    continue
                mine = owner - base == r
                if len(sizes) != int(mine.sum()):  # the row's images are not the column's non-null values
                    per_row[r] = -1
                    continue
                found[mine] = sizes  # one size per image of the row, in order
            counts[base: base + len(rows)] = per_row
            parts.append(found[per_row[owner - base] >= 0])  # the sized rows' images, in row order
            base += len(rows)
    hw = np.concatenate(parts + [hw]) if parts else hw
    n_failed = int((counts < 0).sum())
    if n_failed:
        log.warning("%d of %d samples with images in %s: image size not readable at start, counted as "
                    "data.lazy_image_hw for the length plan (they fail or are skipped when fetched), e.g. %s",
                    n_failed, int((counts != 0).sum()), source, "; ".join(failures[:3]))
    return {"ids": np.arange(n), "counts": counts, "hw": hw}

