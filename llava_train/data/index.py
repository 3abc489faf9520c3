"""The training dataset: lazy for every source kind, so no rank preprocesses the data at start.

At start only length estimates are made, never a tokenisation or a pixel decoded:
- local JSON/JSONL: the file's raw bytes are scanned once, vectorised and in parallel (`LazyIndex`,
  data/jsonscan.py): where each record is (byte offset and size), how many turns and images it has. Per
  sample the index keeps 17 bytes (offset, size, estimated length, has-image); it is saved next to the
  data file (keyed by size and mtime) under a file lock, so with several ranks one scans and the others
  load it;
- HF sources (parquet/arrow/csv, save_to_disk, hub): `datasets` memory-maps the Arrow data; estimates
  come from the text columns (`ArrowRows`), image bytes are decoded per sample at fetch.
The estimate is text bytes / `CHARS_PER_TOKEN` plus a per-turn allowance plus, per image, the exact token
count of its size, read from the image's header at start (`data.image_sizes=headers`, data/imagesizes.py:
JSON sources from the files, in parallel and cached like the index; Arrow sources from the embedded bytes
in place), or of an assumed size (`data.image_sizes=assumed`, `data.lazy_image_hw`).

`LazyConversationDataset.__getitem__` (in DataLoader workers) reads one row and builds it with the one
example-building path (`dataset.prepare`, `dataset.to_item`) that the eval dataset, `llava preview` and
`llava doctor` use too. A sample that fails there is an error (data.on_error=error) or, with on_error=skip
(or the overflow policy for too-long samples), is counted in counters shared by all workers, logged with
its file, index and reason, and replaced by the next sample (`dataset.ExampleDataset`): never silent, and
batches keep their size. Why lazy rather than an exact index built once: see `LazyConversationDataset`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np

from llava_train.config import DataConfig
from llava_train.config.choices import ImageSizes
from llava_train.constants import IMAGE_TOKEN
from llava_train.data.dataset import ExampleDataset, FetchSkips, SkipReport, as_sources, prepare, to_item
from llava_train.data.encoder import Encoder
from llava_train.data.formats import DataError, parse_line
from llava_train.data.images import ImageGeometry, num_image_tokens
from llava_train.data.imagesizes import arrow_sizes, header_sizes
from llava_train.data.imagesizes import image_tokens as image_tokens_of
from llava_train.data.jsonscan import scan
from llava_train.data.pixels import pixel_fn
from llava_train.data.sources import Source, apply_weight, default_image_root, describe, load_hf
from llava_train.files import open_lock

log = logging.getLogger(__name__)
_OPENING = threading.Lock()  # a process's fetch threads open its data file handle once

CHARS_PER_TOKEN = 3.6
"""Characters per token of English chat text with Llama/Mistral tokenizers (measured by
benchmarks/data_pipeline.py on the generated mix)."""
TOKENS_PER_TURN = 6  # template scaffolding per turn ([INST] ... [/INST], </s>)


class LazyIndex:
    """Byte offsets and estimated lengths of the records of a LLaVA JSON list or a JSONL file.

    From a parallel scan of the raw bytes (data/jsonscan.py): where each record is, how many turns and
    images it has; text characters are the record's bytes minus the JSON scaffolding of its turns. No
    record is parsed: a malformed one fails when it is fetched (counted like any bad sample).
    """

    def __init__(self, path: str | Path, *, image_tokens: int, cache: bool = False):
        self.path = Path(path)
        self.image_tokens = image_tokens
        def compute() -> dict[str, np.ndarray]:
            return dict(zip(("starts", "ends", "turns", "images"), scan(self.path)))

        z = _cached(self.path, "lazyindex", (), compute) if cache else compute()
        self.offsets, self.turns, self.images = z["starts"], z["turns"], z["images"]
        self.sizes = (z["ends"] - z["starts"]).astype(np.int32)
        self.text_bytes = np.maximum(self.sizes - RECORD_OVERHEAD - TURN_OVERHEAD * self.turns, 0)
        self.lengths = estimate(self.text_bytes, self.turns, self.images, image_tokens)
        self.has_image = self.images > 0

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, f, i: int) -> Any:
        f.seek(int(self.offsets[i]))
        return json.loads(f.read(int(self.sizes[i])))


RECORD_OVERHEAD = 70  # bytes of {"id": ..., "image": ..., "conversations": [...]} around the turns
TURN_OVERHEAD = 34  # bytes of {"from": "human", "value": ""}, around one turn's text


_CACHE_VERSION = 1


def _cached(path: Path, kind: str, extra: tuple, compute) -> dict[str, np.ndarray]:
    """`compute()` (a dict of arrays), saved next to the data file as `<name>.<kind>.npz` (keyed by the file's
    size and mtime and `extra`) under a file lock: with several ranks one computes and the others load; a
    restart loads. Unwritable folder: just compute."""
    cache = path.with_name(f"{path.name}.{kind}.npz")
    stat = path.stat()
    tag = zlib.crc32(repr(extra).encode())
    key = np.asarray([_CACHE_VERSION, stat.st_size, stat.st_mtime_ns, tag], dtype=np.int64)
    try:  # never through a symlink, never truncating anything (llava_train/files.py)
        lock = os.fdopen(open_lock(path.with_name(path.name + ".lazyindex.lock")), "r+")
    except OSError as e:
        log.warning("%s of %s not cached: %s", kind, path, e)
        return compute()
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if cache.exists():
            with np.load(cache) as z:
                if np.array_equal(z["key"], key):
                    return {k: z[k] for k in z.files if k != "key"}
        out = compute()
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, key=key, **out)
        os.replace(tmp, cache)
        log.info("%s of %s saved to %s", kind, path, cache)
    return out


def estimate(text_bytes, turns, images, image_tokens) -> np.ndarray:
    """Token-length estimates from text size, turn and image counts (vectorised). `image_tokens`: the tokens
    of one image (every image the same size), or per record the tokens of all its images."""
    images = np.asarray(images)
    total = images * image_tokens if np.ndim(image_tokens) == 0 else np.asarray(image_tokens)
    est = np.asarray(text_bytes) / CHARS_PER_TOKEN + TOKENS_PER_TURN * np.asarray(turns) + total - images
    return est.astype(np.int32)


class JsonRows:
    """Rows of a local JSON/JSONL file by `LazyIndex` offsets: one record read and parsed per fetch."""

    def __init__(self, source: Source, cfg: DataConfig, image_tokens: int, geo: Optional[ImageGeometry] = None,
                 image_root: Optional[Path] = None):
        self.path = Path(source.path)
        index = LazyIndex(self.path, image_tokens=image_tokens, cache=cfg.lazy_index_cache)
        self.offsets, self.sizes = index.offsets, index.sizes
        self.lengths, self.has_image = index.lengths, index.has_image
        if cfg.image_sizes == ImageSizes.headers and geo is not None and image_root is not None \
                and index.has_image.any():
            def read() -> dict[str, np.ndarray]:
                t = time.perf_counter()
                out = header_sizes(self.path, index.offsets, index.sizes, np.flatnonzero(index.has_image),
                                   fmt=source.format, image_root=image_root)
                log.info("image sizes of %d samples of %s read from their headers in %.1f s",
                         int(index.has_image.sum()), self.path, time.perf_counter() - t)
                return out
            extra = (os.path.abspath(image_root), source.format)
            found = _cached(self.path, "imagesizes", extra, read) if cfg.lazy_index_cache else read()
            tokens = image_tokens_of(found, len(index), geo)
            tokens = np.where(tokens >= 0, tokens, index.images * image_tokens)  # not readable: assumed size
            self.lengths = estimate(index.text_bytes, index.turns, index.images, tokens)
        self._file, self._pid = None, None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> Any:
        if self._file is None or self._pid != os.getpid():  # one handle per worker process
            with _OPENING:
                if self._file is None or self._pid != os.getpid():
                    self._file, self._pid = open(self.path, "rb"), os.getpid()
        fd = self._file.fileno()
        # pread: no shared file position, so the threads fetching a batch (dataset.py) read concurrently
        offset, size = int(self.offsets[i]), int(self.sizes[i])
        data = os.pread(fd, size, offset)
        while len(data) < size:  # (a short read only near EOF of a file that shrank: parse_line names it)
            more = os.pread(fd, size - len(data), offset + len(data))
            if not more:
                break
            data += more
        return parse_line(data, self.path, i)

    def __getstate__(self):  # spawned workers open their own handle
        return {**self.__dict__, "_file": None, "_pid": None}


class ArrowRows:
    """Rows of an HF source (parquet/arrow/csv files, a save_to_disk folder, a hub id) through `datasets`:
    the Arrow data is memory-mapped (shared by every rank and worker through the page cache), and a
    fetch reads one row, its image bytes included, so no image is ever held in Python memory beyond the
    sample being built. Length estimates come from the text columns, vectorised in pyarrow, and with
    `data.image_sizes=headers` from each image's first bytes, read in place (`imagesizes.arrow_sizes`)."""

    BATCH = 65_536

    def __init__(self, source: Source, cfg: DataConfig, image_tokens: int, geo: Optional[ImageGeometry] = None,
                 image_root: Optional[Path] = None):
        self.path = Path(source.path)
        self.ds = load_hf(source)
        n = len(self.ds)
        text_bytes, turns, images = np.zeros(n), np.zeros(n), np.zeros(n)
        cols = [c for c in ("conversations", "messages") if c in self.ds.column_names]
        if cols:
            text = self.ds.select_columns(cols[:1]).with_format("arrow")
            for start in range(0, n, self.BATCH):
                batch = text[start: start + self.BATCH]
                tb, tu, im = _text_stats(batch.column(0))
                end = start + len(tb)
                text_bytes[start:end], turns[start:end], images[start:end] = tb, tu, im
        self.has_image = images > 0
        tokens = images * image_tokens
        if cfg.image_sizes == ImageSizes.headers and geo is not None and image_root is not None \
                and self.has_image.any():
            def read() -> dict[str, np.ndarray]:
                t = time.perf_counter()
                out = arrow_sizes(self.ds, fmt=source.format, image_root=image_root, source=source.path)
                log.info("image sizes of %d samples of %s read from their headers in %.1f s",
                         int(self.has_image.sum()), source.path, time.perf_counter() - t)
                return out
            # cached next to the dataset's first Arrow file (HF's cache, or a save_to_disk folder), keyed by
            # every Arrow file's name, size and mtime: a restart does not read through the images again
            files = [Path(f["filename"]) for f in self.ds.cache_files]
            if cfg.lazy_index_cache and files:
                stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
                extra = (n, stats, os.path.abspath(image_root), source.format)
                found = _cached(files[0], "imagesizes", extra, read)
            else:
                found = read()
            sized = image_tokens_of(found, n, geo)
            tokens = np.where(sized >= 0, sized, tokens)  # not readable: assumed size
        self.lengths = estimate(text_bytes, turns, images, tokens)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        return self.ds[int(i)]


def _text_stats(column) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a `conversations` / `messages` list column: text bytes, turns, images (placeholders and
    `{"type": "image"}` parts), computed on the Arrow buffers."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(col)
    turns = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
    parent = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(col)
    text_bytes, images = np.zeros(n), np.zeros(n)

    def add(parents, values) -> None:
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            text_bytes[:] += np.bincount(parents, weights=pc.fill_null(pc.binary_length(values), 0)
                                         .to_numpy(zero_copy_only=False), minlength=n)
            images[:] += np.bincount(parents, weights=pc.fill_null(pc.count_substring(values, IMAGE_TOKEN), 0)
                                     .to_numpy(zero_copy_only=False), minlength=n)
        elif pa.types.is_struct(values.type):
            for k in range(values.type.num_fields):
                add(parents, values.field(k))
            names = [values.type.field(k).name for k in range(values.type.num_fields)]
            if "type" in names and pa.types.is_string(values.type.field("type").type):  # {"type": "image"} parts
                is_image = pc.fill_null(pc.equal(values.field("type"), "image"), False).to_numpy(zero_copy_only=False)
                images[:] += np.bincount(parents, weights=is_image, minlength=n)
        elif pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
            inner = pc.list_parent_indices(values).to_numpy(zero_copy_only=False)
            add(parents[inner], pc.list_flatten(values))

    if len(flat):
        add(parent, flat)
    return text_bytes, turns, images


class LazyConversationDataset(ExampleDataset):
    """The training dataset, for every source kind and for `data.sources` mixes: nothing is tokenised,
    parsed or opened at start, on any rank.

    Why lazy rather than one exact index built once: an exact index tokenises every sample (~2.5 ms of
    CPU each: 2.4 CPU-hours for 3.5M samples) before the first step whenever the data or the settings
    change, while length grouping only needs lengths to sort and batch similar samples. So lengths are
    estimated at start (JSON: a vectorised byte scan plus the images' header sizes, both cached next to the
    file for other ranks and restarts; Arrow sources: pyarrow over the text columns plus the embedded
    images' headers), and everything exact happens per sample at fetch in the DataLoader workers, through
    the one example-building path (`dataset.prepare`, then `dataset.to_item`). Bad samples are therefore
    found when fetched: counted (across workers), named in the run summary and replaced
    (`dataset.ExampleDataset`). Token budgets and packing plan with the estimates (a packed row that turns
    out too long is split by the packing collator).

    `lengths` / `has_image` are numpy arrays (one entry per sample after source weights); `source_of` and
    `row_of` map a sample to its source and row.
    """

    def __init__(self, path, cfg: DataConfig, encoder: Encoder, image_processor, *, fmt: Optional[str] = None):
        self.sources = as_sources(path, cfg, fmt)
        self.path = Path(self.sources[0].path)
        self.cfg = cfg
        self.encoder = encoder
        self.image_processor = image_processor
        self.pixels = pixel_fn(image_processor, cfg.fast_pixels)
        self.image_roots = [default_image_root(src, cfg.image_root) for src in self.sources]
        self.image_root = self.image_roots[0]
        h, w = cfg.lazy_image_hw
        geo: Optional[ImageGeometry] = encoder.geometry
        image_tokens = num_image_tokens(h, w, geo) if geo else 1
        self.rows = [(JsonRows if describe(src.path) == "json" else ArrowRows)(src, cfg, image_tokens, geo, root)
                     for src, root in zip(self.sources, self.image_roots)]
        picks = [np.asarray(apply_weight(len(rows), src.weight, cfg.mix_seed + s), dtype=np.int64)
                 for s, (src, rows) in enumerate(zip(self.sources, self.rows))]
        self.source_of = np.concatenate([np.full(len(p), s, dtype=np.int32) for s, p in enumerate(picks)])
        self.row_of = np.concatenate(picks)
        self.lengths = np.concatenate([rows.lengths[p] for rows, p in zip(self.rows, picks)])
        self.has_image = np.concatenate([rows.has_image[p] for rows, p in zip(self.rows, picks)])
        if not len(self.row_of):
            raise DataError("no samples", source=str(self.path))
        self.start_skips = SkipReport()  # nothing is skipped at start: see fetch_skips
        self.fetch_skips = FetchSkips(len(self.row_of))  # shared with forked DataLoader workers

    def __len__(self) -> int:
        return len(self.row_of)

    def _fetch(self, i: int) -> dict[str, Any]:
        s, r = int(self.source_of[i]), int(self.row_of[i])
        source = self.sources[s]
        conv, sizes, enc = prepare(self.rows[s][r], index=r, source=source.path, fmt=source.format,
                                   image_root=self.image_roots[s], encoder=self.encoder)
        return to_item(conv, sizes, enc, self.pixels, self.image_roots[s])
