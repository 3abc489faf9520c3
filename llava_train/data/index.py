"""A lazy index for very large data files (`data.lazy_index=true`), e.g. the 665k-sample LLaVA mix.

At start the file's raw bytes are scanned once, vectorised and in chunks (`LazyIndex`): where each
record is (byte offset and size), how many turns and images it has. Nothing is parsed, tokenised or
opened; per sample the index keeps 17 bytes (offset, size, estimated length, has-image). The length
estimate is text bytes / `CHARS_PER_TOKEN` plus a per-turn allowance plus, per image, the exact token
count of an assumed size (`data.lazy_image_hw`): good enough to group by length and modality.

`LazyConversationDataset.__getitem__` (in DataLoader workers) reads one record, validates, reads the
image headers, encodes and decodes pixels. A sample that fails there is an error (data.on_error=error)
or, with on_error=skip (or overflow=skip for too-long samples), is dropped from its batch, logged with
its file, index and reason, and counted in a counter shared by all workers (`fetch_errors`): never
silent.
"""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from llava_train.config import DataConfig
from llava_train.constants import IMAGE_SIZES, IMAGE_TOKEN, INPUT_IDS, LABELS, PIXEL_VALUES
from llava_train.data.dataset import Encoder, SkipReport, validate_conversation
from llava_train.data.formats import DataError, place_images, to_conversation
from llava_train.data.images import ImageGeometry, image_size, load_rgb, num_image_tokens

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 3.6
"""Characters per token of English chat text with Llama/Mistral tokenizers (measured by
benchmarks/data_pipeline.py on the generated mix)."""
TOKENS_PER_TURN = 6  # template scaffolding per turn ([INST] ... [/INST], </s>)
CHUNK = 32 << 20  # bytes read per step of the scan


class LazyIndex:
    """Byte offsets and estimated lengths of the records of a LLaVA JSON list or a JSONL file.

    The scan is vectorised over raw bytes (numpy), `CHUNK` bytes at a time: unescaped quotes give the
    string state, braces outside strings give each top-level object's start and end. Per record it
    counts turns (`"from"`/`"role"` keys) and images (`<image>` placeholders, `{"type": "image"}` parts);
    text characters are the record's bytes minus the JSON scaffolding of its turns. No record is parsed:
    a malformed one fails when it is fetched (counted like any bad sample).
    """

    def __init__(self, path: str | Path, *, image_tokens: int, cache: bool = False):
        self.path = Path(path)
        self.image_tokens = image_tokens
        starts, ends, turns, images = _cached_scan(self.path) if cache else _scan(self.path)
        self.offsets = starts
        self.sizes = (ends - starts).astype(np.int32)
        text_bytes = np.maximum(self.sizes - RECORD_OVERHEAD - TURN_OVERHEAD * turns, 0)
        est = text_bytes / CHARS_PER_TOKEN + TOKENS_PER_TURN * turns + images * (image_tokens - 1)
        self.lengths = est.astype(np.int32)
        self.has_image = images > 0

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, f, i: int) -> Any:
        f.seek(int(self.offsets[i]))
        return json.loads(f.read(int(self.sizes[i])))


RECORD_OVERHEAD = 70  # bytes of {"id": ..., "image": ..., "conversations": [...]} around the turns
TURN_OVERHEAD = 34  # bytes of {"from": "human", "value": ""}, around one turn's text
_TURN = (b'"from":', b'"from" :', b'"role":', b'"role" :')
_IMAGE = (IMAGE_TOKEN.encode(), b'"type": "image"', b'"type":"image"')
_LONGEST = max(len(p) for p in _TURN + _IMAGE)
assert all(p[0] in (34, 60) for p in _TURN + _IMAGE)  # '"' or '<': the candidates _scan gathers


_CACHE_VERSION = 1


def _cached_scan(path: Path):
    """`_scan`, saved next to the data file as `<name>.lazyindex.npz` (keyed by size and mtime) under a file
    lock: with several ranks one scans and the others load; a restart loads. Unwritable folder: just scan."""
    cache = path.with_name(path.name + ".lazyindex.npz")
    stat = path.stat()
    key = np.asarray([_CACHE_VERSION, stat.st_size, stat.st_mtime_ns], dtype=np.int64)
    try:
        lock = open(path.with_name(path.name + ".lazyindex.lock"), "w")
    except OSError:
        return _scan(path)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if cache.exists():
            with np.load(cache) as z:
                if np.array_equal(z["key"], key):
                    return z["starts"], z["ends"], z["turns"], z["images"]
        starts, ends, turns, images = _scan(path)
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, key=key, starts=starts, ends=ends, turns=turns, images=images)
        os.replace(tmp, cache)
        log.info("lazy index of %s saved to %s", path, cache)
    return starts, ends, turns, images


def _match(a: np.ndarray, candidates: np.ndarray, second: np.ndarray, pat: bytes) -> np.ndarray:
    """Those `candidates` (positions of `pat[0]` in `a`; `second`: the byte after each) where `pat` starts."""
    at = candidates[second == pat[1]]
    at = at[at <= len(a) - len(pat)]
    for k in range(2, len(pat)):
        at = at[a[at + k] == pat[k]]
    return at


def _scan(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(start offsets, end offsets, turns, images) of every top-level JSON object in the file."""
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    turn_pos: list[np.ndarray] = []
    image_pos: list[np.ndarray] = []
    in_string, depth, base, tail = False, 0, 0, b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            # Work on the last bytes of the previous chunk + this chunk: keys and escapes may straddle.
            pre = tail[-_LONGEST:]
            skip = len(pre)
            ctx = np.frombuffer(pre + chunk, dtype=np.uint8)
            quotes = np.flatnonzero(ctx == 34)  # '"' (one pass, reused for the keys below)
            angles = np.flatnonzero(ctx == 60)  # '<'
            after = {34: (quotes, ctx[np.minimum(quotes + 1, len(ctx) - 1)]),
                     60: (angles, ctx[np.minimum(angles + 1, len(ctx) - 1)])}  # gathered once per chunk
            for patterns, found in ((_TURN, turn_pos), (_IMAGE, image_pos)):
                for pat in patterns:
                    at = _match(ctx, *after[pat[0]], pat)
                    found.append(base - skip + at[at + len(pat) > skip])
            q = quotes[quotes >= skip] - skip
            a = ctx[skip:]
            if len(q):  # a quote after an odd run of backslashes is escaped (rare: look each one up)
                maybe = q[ctx[q + skip - 1] == 92] if skip else q[(q > 0) & (a[np.maximum(q - 1, 0)] == 92)]
                if len(maybe):
                    keep = np.ones(len(q), dtype=bool)
                    full = tail + chunk
                    for p in maybe.tolist():
                        k, run = p + len(tail) - 1, 0
                        while k >= 0 and full[k] == 92:
                            run, k = run + 1, k - 1
                        if run % 2:
                            keep[np.searchsorted(q, p)] = False
                    q = q[keep]
            b = np.flatnonzero((a & 0xF9) == 0x79)  # '{' 0x7B, '}' 0x7D (and 'y', DEL: dropped next)
            b = b[(a[b] == 123) | (a[b] == 125)]
            outside = ((np.searchsorted(q, b) + in_string) % 2) == 0
            b = b[outside]
            step = np.where(a[b] == 123, 1, -1)
            level = depth + np.cumsum(step)
            starts.append(base + b[(step == 1) & (level == 1)])
            ends.append(base + b[(step == -1) & (level == 0)] + 1)
            if len(level):
                depth = int(level[-1])
            in_string = bool((len(q) + in_string) % 2)
            base += len(chunk)
            tail = (tail + chunk)[-64:]
    s = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
    e = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
    if len(s) != len(e) or depth != 0:
        raise DataError(f"unbalanced JSON: {len(s)} object start(s), {len(e)} end(s); the file is truncated or "
                        "malformed", source=str(path), kind="malformed_json")

    def per_record(pos: list[np.ndarray]) -> np.ndarray:
        p = np.concatenate(pos) if pos else np.zeros(0, dtype=np.int64)
        k = np.searchsorted(s, p, side="right") - 1
        k = k[(k >= 0) & (p < e[np.maximum(k, 0)])]
        return np.bincount(k, minlength=len(s)).astype(np.int32)

    return s.astype(np.int64), e.astype(np.int64), per_record(turn_pos), per_record(image_pos)


class LazyConversationDataset(torch.utils.data.Dataset):
    """`ConversationDataset`'s interface (`lengths`, `has_image`, items as dicts) over a `LazyIndex`."""

    def __init__(self, path: str, cfg: DataConfig, encoder: Encoder, image_processor, *, fmt: str = "auto"):
        self.path = Path(path)
        self.cfg = cfg
        self.fmt = fmt
        self.image_root = Path(cfg.image_root) if cfg.image_root else self.path.parent
        self.encoder = encoder
        self.image_processor = image_processor
        h, w = cfg.lazy_image_hw
        geo: Optional[ImageGeometry] = encoder.geometry
        self.index = LazyIndex(self.path, image_tokens=num_image_tokens(h, w, geo) if geo else 1,
                               cache=cfg.lazy_index_cache)
        if not len(self.index):
            raise DataError("no samples", source=str(self.path))
        self.lengths = self.index.lengths
        self.has_image = self.index.has_image
        self.skipped = SkipReport()  # nothing is skipped at start; see fetch_errors
        self.fetch_errors = multiprocessing.Value("q", 0)  # shared with forked DataLoader workers
        self._file = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.index)

    def _f(self):
        if self._file is None or self._pid != os.getpid():  # one handle per worker process
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        return self._file

    def __getitem__(self, i: int) -> Optional[dict[str, Any]]:
        try:
            conv = to_conversation(self.index.read(self._f(), i), fmt=self.fmt, source=str(self.path), index=i)
            conv = place_images(conv, self.encoder.image_placement)
            validate_conversation(conv)
            sizes = [image_size(ref, self.image_root, conv, k) for k, ref in enumerate(conv.images)]
            enc = self.encoder.encode(conv, sizes)
            item: dict[str, Any] = {INPUT_IDS: torch.tensor(enc.input_ids, dtype=torch.long),
                                    LABELS: torch.tensor(enc.labels, dtype=torch.long)}
            if enc.num_images:
                kept = conv.images[: enc.num_images]
                images = [load_rgb(ref, self.image_root, conv, k) for k, ref in enumerate(kept)]
                out = self.image_processor(images=images, do_pad=False)
                item[PIXEL_VALUES] = [torch.as_tensor(p) for p in out["pixel_values"]]
                item[IMAGE_SIZES] = [list(s) for s in sizes[: enc.num_images]]
            return item
        except DataError as err:
            skip = self.cfg.overflow == "skip" if err.kind == "too_long" else self.cfg.on_error == "skip"
            if not skip:
                raise
            with self.fetch_errors.get_lock():
                self.fetch_errors.value += 1
                count = self.fetch_errors.value
            self.skipped.add(err)  # this process's view, with examples
            if count <= 20 or count % 1000 == 0:
                log.warning("skipped at fetch (%d so far): %s", count, err)
            return None
