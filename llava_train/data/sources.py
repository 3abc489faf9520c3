"""Where samples come from: local JSON/JSONL, HF `datasets` (json/jsonl/parquet/arrow/csv files, a
`save_to_disk` folder, a hub id), and weighted mixes of several sources.

Rows come out as plain dicts in the LLaVA or messages shape (`data.formats` turns them into
conversations). Image columns stored with the `datasets.Image` feature are read undecoded
(`{bytes, path}`), so indexing a dataset reads image headers only, never pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from llava_train.data.formats import DataError, read_rows

HF_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
LOCAL_JSON = (".json", ".jsonl")


@dataclass(frozen=True)
class Source:
    """One data source (a `data.sources` entry, or `data.train_path` alone)."""

    path: str
    weight: float = 1.0
    format: str = "auto"
    image_root: str = ""
    split: str = "train"
    name: Optional[str] = None


def describe(path: str) -> str:
    """What kind of source `path` is: json | hf_file | saved | hf_folder | hub | missing."""
    p = Path(path)
    if p.is_file():
        return "json" if p.suffix in LOCAL_JSON else ("hf_file" if p.suffix in HF_BUILDERS else "unknown_file")
    if p.is_dir():
        saved = any((p / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))
        return "saved" if saved else "hf_folder"
    if not path.startswith((".", "/", "~")) and path.count("/") == 1 and not p.suffix:
        return "hub"
    return "missing"


def check_path(path: str, key: str) -> list[str]:
    """Problems with a source path, for up-front config validation (no data read)."""
    kind = describe(path)
    if kind == "missing":
        return [f"{key}={path!r} does not exist (a .json/.jsonl/.parquet/.arrow file, a save_to_disk folder "
                "or a hub id owner/name)"]
    if kind == "unknown_file":
        return [f"{key}={path!r}: unknown file type; use .json, .jsonl, .parquet, .arrow or .csv"]
    return []


def default_image_root(source: Source, data_image_root: str) -> Path:
    """Relative image paths resolve against the source's image_root, else data.image_root, else the
    data file's folder (or the current folder for hub ids)."""
    if source.image_root:
        return Path(source.image_root)
    if data_image_root:
        return Path(data_image_root)
    p = Path(source.path)
    return p.parent if p.is_file() else (p if p.is_dir() else Path("."))


def _undecoded(ds):
    """Cast `datasets.Image` columns (and lists of them) to decode=False: {bytes, path} dicts."""
    from datasets import Image, List, Sequence

    for col, feat in ds.features.items():
        if isinstance(feat, Image) and feat.decode:
            ds = ds.cast_column(col, Image(decode=False))
        elif isinstance(feat, (List, Sequence)) and isinstance(feat.feature, Image) and feat.feature.decode:
            ds = ds.cast_column(col, type(feat)(Image(decode=False)))
    return ds


def load_hf(source: Source):
    """An HF `datasets.Dataset` for a non-JSON source."""
    import datasets

    kind = describe(source.path)
    if kind == "saved":
        ds = datasets.load_from_disk(source.path)
        if isinstance(ds, datasets.DatasetDict):
            if source.split not in ds:
                raise DataError(f"split {source.split!r} not in the saved dataset (has {sorted(ds)})",
                                source=source.path)
            ds = ds[source.split]
    elif kind == "hf_file":
        ds = datasets.load_dataset(HF_BUILDERS[Path(source.path).suffix], data_files=source.path, split="train")
    elif kind in ("hf_folder", "hub"):
        ds = datasets.load_dataset(source.path, source.name, split=source.split)
    else:
        raise DataError(f"cannot read {source.path!r}: {check_path(source.path, 'path')}", source=source.path)
    return _undecoded(ds)


def iter_rows(source: Source) -> Iterator[tuple[int, Any]]:
    """(index, row) pairs; a row may be a `DataError` (malformed JSON line) to be reported or skipped."""
    if describe(source.path) == "json":
        yield from read_rows(Path(source.path))
        return
    if describe(source.path) == "missing":
        raise FileNotFoundError(f"data source {source.path} does not exist (set data.train_path / data.sources)")
    yield from enumerate(load_hf(source))


def count_rows(source: Source) -> Optional[int]:
    """Number of rows of an HF source (cheap: memory-mapped); None for JSON files (known once parsed)."""
    if describe(source.path) in ("json", "missing"):
        return None
    return len(load_hf(source))


def apply_weight(n: int, weight: float, seed: int) -> list[int]:
    """Indices (into a source of n items) one epoch uses: weight 2.0 repeats the source twice,
    0.5 keeps a seeded half, 1.5 adds a seeded half to one full copy."""
    if weight < 0:
        raise ValueError(f"a source weight must be >= 0, got {weight}")
    whole = int(weight)
    out = list(range(n)) * whole
    extra = round((weight - whole) * n)
    if extra:
        out += sorted(random.Random(seed).sample(range(n), extra))
    return out
