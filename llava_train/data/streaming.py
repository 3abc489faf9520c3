"""Streaming training data (`data.streaming=true`): HF `datasets` streaming sources and WebDataset tar shards.

Nothing is indexed: `datasets` reads the source as an `IterableDataset` (tar shards through its
`webdataset` builder, local paths, globs or any fsspec URL; parquet/arrow files and hub ids through
their builders), images undecoded. The stream is split over ranks with `split_dataset_by_node` (whole
shards when their number divides by the world size, else every rank reads all and keeps its share), and
`datasets` splits each rank's shards over the DataLoader workers: every sample is read by exactly one
worker of one rank per epoch. Shuffling is `datasets`' seeded shard order + example buffer
(`data.stream_shuffle_buffer`), reseeded per epoch.

Each worker builds examples with the one example-building path (`dataset.prepare`: exact lengths), keeps
`data.group_window` batches' worth of them, and cuts length-sorted batches from that window (length
grouping inside the buffer), then decodes pixels (`dataset.to_item`) for one batch at a time. A bad
sample is counted (shared across workers) and dropped from its batch, so batch composition never depends
on decoding, and resuming can replay it exactly.

Resume: every batch carries the id of the worker that made it; the loader (`StreamingLoader`) counts
consumed batches per worker, and that count is the state saved with each checkpoint. On resume each
worker replays its stream up to there without decoding any pixel (rows are read and tokenised for their
lengths) and continues with the next unseen batch.
"""

from __future__ import annotations

import glob
import logging
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from llava_train.config import DataConfig
from llava_train.data.dataset import FetchSkips, SkipReport, prepare, should_skip, to_item
from llava_train.data.encoder import Encoder
from llava_train.data.formats import DataError
from llava_train.data.images import FORMAT_EXTENSIONS
from llava_train.data.pixels import pixel_fn
from llava_train.data.sources import HF_BUILDERS, Source, _undecoded, default_image_root, describe

log = logging.getLogger(__name__)

WORKER = "_stream_worker"  # batch key: the worker that made the batch (removed by StreamingLoader)
_IMAGE_FIELDS = {ext.lstrip(".") for exts in FORMAT_EXTENSIONS.values() for ext in exts}


def is_tar_shards(path: str) -> bool:
    return path.split("::")[0].rstrip("/").endswith(".tar") or ".tar" in Path(path).name


def open_stream(source: Source):
    """The source as a `datasets.IterableDataset` of raw rows, images undecoded."""
    import datasets

    path = source.path
    if is_tar_shards(path):
        files = sorted(glob.glob(path)) if "://" not in path else [path]
        if not files:
            raise DataError(f"no tar shards match {path!r}", source=path)
        # Declared, not inferred from the first samples (inference fails when text-only samples, without
        # an image file, and image samples mix): a .json record and images of the allowed formats.
        features = datasets.Features({"__key__": datasets.Value("string"), "__url__": datasets.Value("string"),
                                      "json": datasets.Json(),
                                      **{ext: datasets.Image(decode=False) for ext in sorted(_IMAGE_FIELDS)}})
        ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True,
                                   features=features)
    elif describe(path) == "hf_file":
        ds = datasets.load_dataset(HF_BUILDERS[Path(path).suffix], data_files=path, split="train", streaming=True)
    else:
        ds = datasets.load_dataset(path, source.name, split=source.split, streaming=True)
    return _undecoded(ds) if ds.features else ds


def webdataset_row(row: dict) -> Any:
    """A WebDataset sample (`key.json` with the LLaVA/messages record, `key.jpg`/`.png`/...: its images, in
    field-name order) as a row; other rows pass through."""
    if "__key__" not in row:
        return row
    record = row.get("json")
    if not isinstance(record, dict):
        return DataError("the sample has no .json record", source=row.get("__url__", ""), sample_id=row["__key__"],
                         kind="invalid")
    images = [row[k] for k in sorted(row) if k.rsplit(".", 1)[-1].lower() in _IMAGE_FIELDS and row[k] is not None]
    out = dict(record)
    out.setdefault("id", row["__key__"])
    if images:
        out["images" if "messages" in out else "image"] = images
    return out


class StreamingDataset(torch.utils.data.IterableDataset):
    """Batches (lists of items) from a stream, for one rank; see the module docstring."""

    def __init__(self, source: Source, cfg: DataConfig, encoder: Encoder, image_processor, *, rank: int,
                 world_size: int, batch_size: int, seed: int):
        from datasets.distributed import split_dataset_by_node

        self.source, self.cfg, self.encoder, self.image_processor = source, cfg, encoder, image_processor
        self.pixels = pixel_fn(image_processor, cfg.fast_pixels)
        self.path = Path(source.path)
        self.image_root = default_image_root(source, cfg.image_root)
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.stream = split_dataset_by_node(open_stream(source), rank=rank, world_size=world_size)
        self.resume: dict[int, int] = {}  # worker id -> batches to replay silently
        self.start_skips = SkipReport()
        self.fetch_skips = FetchSkips(0)

    @property
    def skipped(self) -> SkipReport:
        return self.fetch_skips.report()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _examples(self) -> Iterator[tuple]:
        stream = self.stream
        if self.cfg.stream_shuffle_buffer:
            stream = stream.shuffle(seed=self.seed, buffer_size=self.cfg.stream_shuffle_buffer)
        stream.set_epoch(self.epoch)
        for index, row in enumerate(stream):
            try:
                conv, sizes, enc = prepare(webdataset_row(row), index=index, source=str(self.path),
                                           fmt=self.source.format, image_root=self.image_root, encoder=self.encoder)
            except DataError as err:
                self._skip(err)
                continue
            yield conv, sizes, enc

    def _skip(self, err: DataError) -> None:
        if not should_skip(err, self.cfg):
            raise err
        count = self.fetch_skips.add(-1, err)
        if count <= 20 or count % 1000 == 0:
            log.warning("skipped in the stream (%d so far): %s", count, err)

    def _batches(self) -> Iterator[list[tuple]]:
        """Length-grouped batches of prepared examples: `group_window` batches' worth at a time, sorted by
        length, cut into batches, those batches in a seeded random order."""
        import random

        rnd = random.Random(f"{self.seed}/{self.epoch}")
        window = self.batch_size * max(1, self.cfg.group_window)
        pool: list[tuple] = []

        def cut(pool):
            if self.cfg.group_by_length:
                pool.sort(key=lambda e: len(e[2].input_ids))
            batches = [pool[k: k + self.batch_size] for k in range(0, len(pool), self.batch_size)]
            rnd.shuffle(batches)
            return batches

        for example in self._examples():
            pool.append(example)
            if len(pool) == window:
                yield from cut(pool)
                pool = []
        if pool:
            yield from cut(pool)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        replay = self.resume.get(wid, 0)
        for k, batch in enumerate(self._batches()):
            if k < replay:
                continue
            items = []
            for conv, sizes, enc in batch:
                try:
                    items.append(to_item(conv, sizes, enc, self.pixels, self.image_root))
                except DataError as err:
                    self._skip(err)
            yield {"items": items, WORKER: wid}


class StreamingLoader:
    """A DataLoader over a `StreamingDataset` that counts consumed batches per worker (the resume state)
    and collates each batch with `collate`. It keeps its own epochs (each pass over the stream is one) and
    has no `set_epoch`: HF Trainer's epoch counter means nothing for data without a length."""

    def __init__(self, dataset: StreamingDataset, collate, *, num_workers: int, prefetch_factor: Optional[int] = None,
                 worker_init_fn: Optional[Callable[[int], None]] = None):
        self.dataset, self.collate = dataset, collate
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.worker_init_fn = worker_init_fn
        self.consumed: dict[int, int] = {}

    def state_dict(self) -> dict:
        return {"epoch": self.dataset.epoch, "consumed": {str(k): v for k, v in self.consumed.items()},
                "num_workers": self.num_workers}

    def load_state_dict(self, state: dict) -> None:
        if state["num_workers"] != self.num_workers:
            raise ValueError(f"the stream state was saved with {state['num_workers']} DataLoader workers; resume "
                             f"with data.num_workers={state['num_workers']} (now {self.num_workers})")
        self.dataset.set_epoch(state["epoch"])
        self.consumed = {int(k): v for k, v in state["consumed"].items()}

    def __iter__(self) -> Iterator[dict]:
        self.dataset.resume = dict(self.consumed)
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                             prefetch_factor=self.prefetch_factor if self.num_workers else None,
                                             worker_init_fn=self.worker_init_fn)
        # The DataLoader asks workers in turn from worker 0; an uninterrupted epoch's batch t comes from
        # worker t % W. After a resume, batches are put back in that order (a worker whose turn it is but
        # which has ended is noticed when the others are 2 rounds ahead, and leaves the rotation).
        workers = max(1, self.num_workers)
        active = list(range(workers))
        turn = sum(self.consumed.values()) % workers
        pending: dict[int, deque] = {w: deque() for w in active}

        def ready():
            nonlocal turn
            while active:
                if pending[turn]:
                    batch = pending[turn].popleft()
                    self.consumed[turn] = self.consumed.get(turn, 0) + 1
                    turn = active[(active.index(turn) + 1) % len(active)]
                    yield batch
                elif sum(map(len, pending.values())) > 2 * workers or done:
                    nxt = active[(active.index(turn) + 1) % len(active)]
                    active.remove(turn)
                    turn = nxt
                else:
                    return

        done = False
        for batch in loader:
            pending[batch.pop(WORKER)].append(batch)
            for ready_batch in ready():
                if ready_batch["items"]:
                    yield self.collate(ready_batch["items"])
        done = True
        for ready_batch in ready():
            if ready_batch["items"]:
                yield self.collate(ready_batch["items"])
        self.dataset.set_epoch(self.dataset.epoch + 1)
        self.consumed = {}
