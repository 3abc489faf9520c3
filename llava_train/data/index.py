"""A lazy index for very large data files (`data.lazy_index=true`), e.g. the 665k-sample LLaVA mix.

At start the file is scanned once in chunks: every record is parsed by the C JSON decoder only to
find where it is (byte offset and size) and to *estimate* its length, then dropped. Nothing is
tokenised and no image is opened; per sample the index keeps 17 bytes (offset, size, estimated
length, has-image). The estimate is text characters / `CHARS_PER_TOKEN` plus a per-turn allowance
plus, per image, the exact token count of an assumed size (`data.lazy_image_hw`): good enough to
group by length and modality.

`LazyConversationDataset.__getitem__` (in DataLoader workers) reads one record, validates, reads the
image headers, encodes and decodes pixels. A sample that fails there is an error (data.on_error=error)
or, with on_error=skip (or overflow=skip for too-long samples), is dropped from its batch, logged with
its file, index and reason, and counted in a counter shared by all workers (`fetch_errors`): never
silent.
"""

from __future__ import annotations

import codecs
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
from llava_train.data.formats import DataError, to_conversation
from llava_train.data.images import ImageGeometry, image_size, load_rgb, num_image_tokens

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 3.6
"""Characters per token of English chat text with Llama/Mistral tokenizers (measured by
benchmarks/data_pipeline.py on the generated mix)."""
TOKENS_PER_TURN = 6  # template scaffolding per turn ([INST] ... [/INST], </s>)
CHUNK = 32 << 20  # bytes read per step of the scan
_WS = " \t\r\n,"


class LazyIndex:
    """Byte offsets and estimated lengths of the records of a LLaVA JSON list or a JSONL file."""

    def __init__(self, path: str | Path, *, image_tokens: int):
        self.path = Path(path)
        self.image_tokens = image_tokens
        offsets, sizes, lengths, images = [], [], [], []
        for off, size, record in _scan(self.path):
            offsets.append(off)
            sizes.append(size)
            n_img, chars, turns = _shape(record)
            lengths.append(int(chars / CHARS_PER_TOKEN) + TOKENS_PER_TURN * turns + n_img * (image_tokens - 1))
            images.append(n_img > 0)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int32)
        self.lengths = np.asarray(lengths, dtype=np.int32)
        self.has_image = np.asarray(images, dtype=bool)

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, f, i: int) -> Any:
        f.seek(int(self.offsets[i]))
        return json.loads(f.read(int(self.sizes[i])))


def _shape(record: Any) -> tuple[int, int, int]:
    """(images, text characters, turns) of a raw LLaVA or messages record, without validating it."""
    if not isinstance(record, dict):
        return 0, 0, 0
    turns = record.get("conversations") or record.get("messages") or []
    chars = 0
    n_img = 0
    for t in turns if isinstance(turns, list) else []:
        if not isinstance(t, dict):
            continue
        v = t.get("value", t.get("content"))
        if isinstance(v, str):
            chars += len(v)
            n_img += v.count(IMAGE_TOKEN)
        elif isinstance(v, list):
            for part in v:
                if isinstance(part, dict):
                    chars += len(part.get("text") or "")
                    n_img += part.get("type") == "image"
    return n_img, chars, len(turns) if isinstance(turns, list) else 0


def _scan(path: Path):
    """Yield (byte offset, byte size, parsed record) for each record, reading `CHUNK` bytes at a time."""
    if path.suffix == ".jsonl":
        off = 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f):
                if line.strip():
                    try:
                        yield off, len(line), json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"malformed JSON on line {lineno + 1}: {exc.msg}; fix or remove that line",
                                        source=str(path), index=lineno, kind="malformed_json") from None
                off += len(line)
        return
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        buf, pos, bpos, eof, started, index = "", 0, 0, False, False, 0
        while True:
            while pos < len(buf) and buf[pos] in _WS:  # separators are ASCII: one char, one byte
                pos, bpos = pos + 1, bpos + 1
            if not started and pos < len(buf):
                if buf[pos] != "[":
                    raise DataError("expected a JSON list of samples (or use .jsonl, one sample per line)",
                                    source=str(path))
                pos, bpos, started = pos + 1, bpos + 1, True
                continue
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                if pos >= len(buf):
                    raise json.JSONDecodeError("need more", buf, pos)
                record, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                if eof:
                    raise DataError(f"malformed JSON near sample #{index}: {exc.msg}", source=str(path), index=index,
                                    kind="malformed_json") from None
                chunk = f.read(CHUNK)
                eof = not chunk
                buf = buf[pos:] + utf8.decode(chunk, final=eof)
                pos = 0
                continue
            size = len(buf[pos:end].encode("utf-8"))
            yield bpos, size, record
            pos, bpos, index = end, bpos + size, index + 1


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
        self.index = LazyIndex(self.path, image_tokens=num_image_tokens(h, w, geo) if geo else 1)
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
