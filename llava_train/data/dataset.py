"""Raw rows to exact training examples, and the datasets that serve them.

`prepare` is the one function that turns a raw row into a checked conversation, its image sizes and
its encoding (`data.encoder.Encoder`); `to_item` decodes pixels into the training item. Every data path
calls them: the lazy training dataset (`data/index.py`), streaming (`data/streaming.py`), the exact eval
`ConversationDataset`, `llava preview` and `llava doctor`. Bad samples are counted and reported by kind
(`SkipReport`, `FetchSkips` across DataLoader workers), never dropped silently.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from llava_train.config import DataConfig
from llava_train.constants import IMAGE_SIZES, INPUT_IDS, LABELS, PIXEL_VALUES
from llava_train.data.encoder import Encoded, Encoder, validate_conversation
from llava_train.data.formats import Conversation, DataError, place_images, to_conversation
from llava_train.data.images import image_size, load_rgb, resolve_ref
from llava_train.data.pixels import PixelFn, pixel_fn
from llava_train.data.sources import Source, apply_weight, check_path, default_image_root, iter_rows

log = logging.getLogger(__name__)

FORMATS = ("auto", "llava", "messages")


@dataclass
class SkipReport:
    """Samples left out of a dataset, by kind, with the first few ids and messages of each (never silent)."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    ids: dict[str, list[str]] = field(default_factory=dict)
    keep: int = 3

    def add(self, err: DataError) -> None:
        where = err.sample_id if err.sample_id is not None else (f"#{err.index}" if err.index is not None else "?")
        self.record(err.kind, str(where), str(err))

    def record(self, kind: str, sample_id: str, message: str) -> None:
        self.counts[kind] += 1
        self.examples.setdefault(kind, [])
        self.ids.setdefault(kind, [])
        if len(self.examples[kind]) < self.keep:
            self.examples[kind].append(message)
            self.ids[kind].append(sample_id)

    def merge(self, other: "SkipReport") -> None:
        for kind, n in other.counts.items():
            self.counts[kind] += n
            self.examples.setdefault(kind, [])
            self.ids.setdefault(kind, [])
            room = self.keep - len(self.examples[kind])
            self.examples[kind] += other.examples.get(kind, [])[:room]
            self.ids[kind] += other.ids.get(kind, [])[:room]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no samples skipped"
        lines = [f"{self.total} sample(s) skipped:"]
        for kind, n in self.counts.most_common():
            lines.append(f"  {kind}: {n}  e.g. {self.examples[kind][0]}")
        return "\n".join(lines)


# Every kind a `DataError` can have (the shared fetch-time counters index into this); others count as "invalid".
SKIP_KINDS = ("invalid", "malformed_json", "bad_encoding", "too_deep", "bad_structure", "unknown_role",
              "non_string_text", "empty_reply", "placeholder_mismatch", "template_mismatch", "too_long",
              "bad_image_ref", "missing_image", "not_a_file", "path_escape", "bad_image_format", "corrupt_image",
              "image_too_large")
MAX_REPLACEMENTS = 32  # consecutive failing samples before a fetch gives up (something systematic is wrong)


class FetchSkips:
    """Samples skipped when fetched (pixels decoded in DataLoader workers), counted in shared memory so
    the main process sees what every worker skipped: counts by kind and the first `keep` messages (each
    names the file, the sample and the field). Each of the `n` samples counts once, however often it is
    fetched (as itself or as a replacement; over epochs). Created before workers start (inherited)."""

    MESSAGE_BYTES = 400

    def __init__(self, n: int, keep: int = 5):
        import multiprocessing

        self.seen = multiprocessing.Array("B", (n + 7) // 8, lock=False)  # one bit per sample
        self.keep = keep
        self.counts = multiprocessing.Array("q", len(SKIP_KINDS))
        self.first_kind = multiprocessing.Array("q", [-1] * keep, lock=False)
        self.first_id = multiprocessing.Array("c", self.MESSAGE_BYTES * keep, lock=False)
        self.first_message = multiprocessing.Array("c", self.MESSAGE_BYTES * keep, lock=False)

    def add(self, i: int, err: DataError) -> int:
        """Count sample `i` failing with `err` (once); returns how many samples were skipped at fetch so far."""
        code = SKIP_KINDS.index(err.kind) if err.kind in SKIP_KINDS else 0
        where = err.sample_id if err.sample_id is not None else (f"#{err.index}" if err.index is not None else "?")
        with self.counts.get_lock():
            total = sum(self.counts[:])
            if i >= 0:  # i < 0: a sample without an index (streams: each is read once per epoch)
                if self.seen[i // 8] & (1 << (i % 8)):
                    return total
                self.seen[i // 8] |= 1 << (i % 8)
            self.counts[code] += 1
            if total < self.keep:
                b = self.MESSAGE_BYTES
                self.first_kind[total] = code
                self.first_id[total * b: (total + 1) * b] = str(where).encode()[:b].ljust(b, b"\0")
                self.first_message[total * b: (total + 1) * b] = str(err).encode()[:b].ljust(b, b"\0")
        return total + 1

    def report(self) -> SkipReport:
        out = SkipReport()
        b = self.MESSAGE_BYTES
        with self.counts.get_lock():
            counts = list(self.counts[:])
            for k in range(self.keep):
                if self.first_kind[k] >= 0:
                    out.record(SKIP_KINDS[self.first_kind[k]],
                               self.first_id[k * b: (k + 1) * b].rstrip(b"\0").decode(errors="replace"),
                               self.first_message[k * b: (k + 1) * b].rstrip(b"\0").decode(errors="replace"))
        for code, n in enumerate(counts):  # record() above counted the kept ones once
            if n:
                out.counts[SKIP_KINDS[code]] = n
        return out


def prepare(row: Any, *, index: int, source: str, fmt: str, image_root: Path,
            encoder: Encoder) -> tuple[Conversation, list[tuple[int, int]], Encoded]:
    """One raw row to a checked conversation (image references resolved), its image sizes (headers
    only) and its encoding. Raises `DataError` naming the sample for anything wrong with it."""
    if isinstance(row, DataError):
        raise row
    conv = place_images(to_conversation(row, fmt=fmt, source=source, index=index), encoder.image_placement)
    validate_conversation(conv)
    sizes = resolve_and_size(conv, image_root)
    return conv, sizes, encoder.encode(conv, sizes)


def resolve_and_size(conv: Conversation, image_root: Path) -> list[tuple[int, int]]:
    """Resolves `conv.images` against `image_root` (in place) and returns their (height, width) from the
    headers: `prepare`'s image step, also the length plan's fallback (data/imagesizes.py)."""
    conv.images = [resolve_ref(ref, image_root, conv, k) for k, ref in enumerate(conv.images)]
    return [image_size(ref, image_root, conv, k) for k, ref in enumerate(conv.images)]


def to_item(conv: Conversation, sizes: list[tuple[int, int]], enc: Encoded, pixels: PixelFn,
            image_root: Path) -> dict[str, Any]:
    """A training item: ids and labels as tensors and, for the kept images, decoded pixels (every pixel:
    cut or corrupt image data raises a `DataError` here) turned into pixel values by `pixels`
    (data/pixels.py: the image processor's values)."""
    item: dict[str, Any] = {
        INPUT_IDS: torch.tensor(enc.input_ids, dtype=torch.long),
        LABELS: torch.tensor(enc.labels, dtype=torch.long),
    }
    if enc.num_images:
        images = [load_rgb(ref, image_root, conv, k) for k, ref in enumerate(conv.images[: enc.num_images])]
        item[PIXEL_VALUES] = [torch.as_tensor(p) for p in pixels(images)]
        item[IMAGE_SIZES] = [list(s) for s in sizes[: enc.num_images]]
    return item


def should_skip(err: DataError, cfg: DataConfig) -> bool:
    """Too-long samples follow data.overflow; every other bad sample follows data.on_error."""
    if err.kind == "too_long":
        return cfg.overflow != "error"
    return cfg.on_error == "skip"


def as_sources(path: Union[str, list, None], cfg: DataConfig, fmt: Optional[str] = None) -> list[Source]:
    """`path` (a file/folder/hub id, or a list of `data.sources` entries) as `Source`s."""
    fmt = fmt or cfg.format
    if isinstance(path, (str, Path)) and str(path):
        return [Source(path=str(path), format=fmt, image_root=cfg.image_root)]
    entries = path or cfg.sources
    if not entries:
        raise ValueError("no data: set data.train_path or data.sources")
    return [Source(path=e.path, weight=e.weight, format=e.format or fmt, image_root=e.image_root or cfg.image_root,
                   split=e.split, name=e.name) for e in entries]


def iter_encoded(source: Source, cfg: DataConfig, encoder: Encoder, skipped: SkipReport):
    """(conversation, image sizes, `Encoded`) for each usable row of `source`, in order; a bad row is
    added to `skipped` or raised, as `data.on_error` / `data.overflow` say."""
    root = default_image_root(source, cfg.image_root)
    for index, row in iter_rows(source):
        try:
            yield prepare(row, index=index, source=source.path, fmt=source.format, image_root=root, encoder=encoder)
        except DataError as err:
            if not should_skip(err, cfg):
                raise
            skipped.add(err)


class ExampleDataset(torch.utils.data.Dataset):
    """What the eager and the lazy dataset share: fetching with the bad-data policy.

    `_fetch(i)` builds item i (decoding pixels). A sample that fails there is raised (data.on_error=error,
    or data.overflow=error for too-long ones: the `DataError` names file, sample and field) or skipped:
    counted in `fetch_skips` (shared by all DataLoader workers), logged, and replaced by the next sample
    that works, so every batch still forms with its planned size. `skipped` is the whole report: samples
    left out at start plus those skipped at fetch so far.
    """

    cfg: DataConfig
    start_skips: SkipReport
    fetch_skips: FetchSkips

    def _fetch(self, i: int) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def skipped(self) -> SkipReport:
        out = SkipReport()
        out.merge(self.start_skips)
        out.merge(self.fetch_skips.report())
        return out

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A batch's items, in order (torch's DataLoader fetches a batch with this). `fetch_threads(cfg)`
        threads fetch them together: decoding, resizing and the pixel lookup release the GIL, so on 2
        cores a batch is ready ~1.6x sooner in the training process, whose compute threads only wait
        for it there."""
        threads = min(fetch_threads(self.cfg), len(indices))
        if threads <= 1:
            return [self[i] for i in indices]
        return list(_pool(threads).map(self.__getitem__, indices))

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        for attempt in range(min(MAX_REPLACEMENTS, n)):
            j = (i + attempt) % n
            try:
                return self._fetch(j)
            except DataError as err:
                if not should_skip(err, self.cfg):
                    raise
                before = sum(self.fetch_skips.counts[:])
                count = self.fetch_skips.add(j, err)
                if count > before and (count <= 20 or count % 1000 == 0):
                    log.warning("skipped at fetch (%d so far; replaced by the next sample): %s", count, err)
        raise DataError(f"{min(MAX_REPLACEMENTS, n)} consecutive samples from #{i} failed when fetched "
                        f"({self.fetch_skips.report().summary()}); something systematic is wrong (data.image_root?)",
                        source=str(getattr(self, "path", "")), index=i)


def fetch_threads(cfg: DataConfig) -> int:
    """data.fetch_threads, or auto: in the training process (0 DataLoader workers) torch's compute threads,
    whose cores are idle while the step waits for its batch; 1 in a DataLoader worker (the workers are
    the parallelism there, and torch gives each one thread)."""
    if cfg.fetch_threads is not None:
        return max(1, cfg.fetch_threads)
    return 1 if torch.utils.data.get_worker_info() is not None else max(1, torch.get_num_threads())


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """This process's pool of `threads` fetch threads (a forked worker makes its own: threads do not fork)."""
    key = (os.getpid(), threads)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="llava-fetch")
    return _POOLS[key]


class ConversationDataset(ExampleDataset):
    """A data source (or a weighted mix of sources) as training examples.

    Indexing reads image headers only; pixels are decoded lazily per item (DataLoader workers).
    `items[i]` is `(conversation, image sizes)`, `lengths[i]` its token count (images expanded),
    `skipped` the `SkipReport` of samples left out.
    """

    def __init__(self, path, cfg: DataConfig, encoder: Encoder, image_processor, *, fmt: Optional[str] = None):
        self.sources = as_sources(path, cfg, fmt)
        self.path = Path(self.sources[0].path)
        self.image_root = default_image_root(self.sources[0], cfg.image_root)
        self.encoder = encoder
        self.image_processor = image_processor
        self.pixels = pixel_fn(image_processor, cfg.fast_pixels)
        self.cfg = cfg
        self.start_skips = SkipReport()
        self.items: list[tuple[Conversation, list[tuple[int, int]]]] = []
        self.lengths: list[int] = []
        self.source_index: list[int] = []  # which source each item came from
        self.root_of = [default_image_root(src, cfg.image_root) for src in self.sources]
        for s, source in enumerate(self.sources):
            items, lengths = [], []
            for conv, sizes, enc in iter_encoded(source, cfg, encoder, self.start_skips):
                items.append((conv, sizes))
                lengths.append(len(enc.input_ids))
            for k in apply_weight(len(items), source.weight, cfg.mix_seed + s):
                self.items.append(items[k])
                self.lengths.append(lengths[k])
                self.source_index.append(s)
        self.fetch_skips = FetchSkips(len(self.items))
        if self.start_skips.total:
            log.warning("%s: %s", self.path, self.start_skips.summary())
        if not self.items:
            raise DataError("no usable samples" + (f" ({self.start_skips.summary()})" if self.start_skips.total
                                                   else ""),
                            source=str(self.path))

    def __len__(self) -> int:
        return len(self.items)

    def _fetch(self, i: int) -> dict[str, Any]:
        conv, sizes = self.items[i]
        return to_item(conv, sizes, self.encoder.encode(conv, sizes), self.pixels,
                       self.root_of[self.source_index[i]])

    def conversation(self, i: int) -> Conversation:
        return self.items[i][0]

    def question_type(self, i: int) -> str:
        return self.items[i][0].question_type


def check_stream(cfg: DataConfig) -> list[str]:
    """Problems with a streaming source (data.streaming): one source; local tar shards must exist."""
    import glob

    if cfg.sources or not cfg.train_path:
        return ["data.streaming reads one source: set data.train_path (tar shards, a parquet/arrow file or a hub "
                "id), not data.sources"]
    path = cfg.train_path
    if ".tar" in Path(path).name and "://" not in path and not glob.glob(path):
        return [f"data.train_path={path!r}: no tar shards match it"]
    if ".tar" not in Path(path).name and "://" not in path:
        return check_path(path, "data.train_path")
    return []


def check_data(cfg: DataConfig) -> list[str]:
    """Problems with a `DataConfig`, for up-front validation (nothing is read but file existence)."""
    problems: list[str] = []
    if not cfg.train_path and not cfg.sources:
        problems.append("set data.train_path or data.sources")
    if cfg.streaming:
        problems += check_stream(cfg)
    elif cfg.train_path:
        problems += check_path(cfg.train_path, "data.train_path")
    for k, src in enumerate(cfg.sources):
        problems += check_path(src.path, f"data.sources[{k}].path")
        if src.weight < 0:
            problems.append(f"data.sources[{k}].weight={src.weight} must be >= 0")
        if src.format not in ("",) + FORMATS:
            problems.append(f"data.sources[{k}].format={src.format!r}: use one of {FORMATS}")
    if cfg.eval_path:
        problems += check_path(cfg.eval_path, "data.eval_path")
    if cfg.image_root and not Path(cfg.image_root).is_dir():
        problems.append(f"data.image_root={cfg.image_root!r} is not a folder")
    return problems  # data.overflow / on_error / format are closed choices: refused at composition
