"""HF datasets sources: a save_to_disk folder with the datasets.Image feature, a parquet file with
embedded image bytes, arrow, messages-format rows, and several sources mixed with weights."""

import io
import json

import datasets
import pytest
from PIL import Image

from conftest import DEMO
from llava_train.config import DataConfig
from llava_train.config.schema import DataSourceConfig
from llava_train.data.dataset import ConversationDataset, check_data
from llava_train.data.sources import apply_weight

SIZES = [(40, 30), (30, 56), (28, 28)]  # (width, height)


def _png(w, h, colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def _llava_rows():
    return {
        "id": [f"s{i}" for i in range(3)],
        "image": [{"bytes": _png(w, h, (200, 20 * i, 20)), "path": None} for i, (w, h) in enumerate(SIZES)],
        "conversations": [[{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]] * 3,
    }


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    features = datasets.Features({
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
    })
    ds = datasets.Dataset.from_dict(_llava_rows(), features=features)
    ds.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(root / "saved_dict"))
    ds.to_parquet(str(root / "train.parquet"))  # image bytes embedded in the file
    # messages format, images as a list of bytes, one text-only row
    msgs = datasets.Dataset.from_list([
        {"id": "m0", "images": [_png(40, 30, (0, 0, 255))],
         "messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                                   {"type": "text", "text": "Colour?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]},
        {"id": "m1", "images": [],
         "messages": [{"role": "user", "content": [{"type": "text", "text": "Sky colour?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]},
    ])
    msgs.to_parquet(str(root / "messages.parquet"))
    return root


def _check(ds, n):
    assert len(ds) == n and ds.skipped.total == 0
    item = ds[0]
    assert item["input_ids"].shape == item["labels"].shape
    assert item["image_sizes"][0] == [SIZES[0][1], SIZES[0][0]]
    assert ds.items[0][1] == [(h, w) for w, h in SIZES[:1]]  # sizes read from headers


def test_save_to_disk_folder(hf_dir, encoder, processor):
    path = str(hf_dir / "saved")
    _check(ConversationDataset(path, DataConfig(train_path=path), encoder, processor.image_processor), 3)
    # a DatasetDict folder: the source's split picks one
    cfg = DataConfig(sources=[DataSourceConfig(path=str(hf_dir / "saved_dict"), split="validation")])
    _check(ConversationDataset("", cfg, encoder, processor.image_processor), 1)


def test_parquet_with_embedded_image_bytes(hf_dir, encoder, processor):
    path = str(hf_dir / "train.parquet")
    ds = ConversationDataset(path, DataConfig(train_path=path), encoder, processor.image_processor)
    _check(ds, 3)
    assert isinstance(ds.items[0][0].images[0], dict) and ds.items[0][0].images[0]["bytes"]


def test_messages_parquet_with_text_only_rows(hf_dir, encoder, processor):
    path = str(hf_dir / "messages.parquet")
    ds = ConversationDataset(path, DataConfig(train_path=path, format="messages"), encoder,
                             processor.image_processor)
    assert len(ds) == 2 and len(ds.items[0][1]) == 1 and ds.items[1][1] == []
    assert "pixel_values" not in ds[1]


def test_weighted_mix(hf_dir, encoder, processor):
    cfg = DataConfig(sources=[
        DataSourceConfig(path=str(hf_dir / "train.parquet"), weight=2.0),
        DataSourceConfig(path=str(DEMO / "eval.json"), weight=0.5),
        DataSourceConfig(path=str(hf_dir / "messages.parquet"), weight=1.0, format="messages"),
    ])
    assert check_data(cfg) == []
    ds = ConversationDataset("", cfg, encoder, processor.image_processor)
    n_eval = len(json.loads((DEMO / "eval.json").read_text()))
    assert ds.source_index.count(0) == 6 and ds.source_index.count(1) == round(n_eval / 2)
    assert ds.source_index.count(2) == 2 and len(ds) == len(ds.lengths) == 8 + round(n_eval / 2)
    # demo images resolve against the demo file's folder
    assert ds[ds.source_index.index(1)]["pixel_values"][0].ndim == 4


def test_apply_weight_is_seeded():
    assert apply_weight(4, 1.5, seed=0) == apply_weight(4, 1.5, seed=0)
    assert len(apply_weight(10, 0.3, seed=1)) == 3 and len(apply_weight(10, 2.0, seed=1)) == 20


def test_check_data_lists_every_problem(tmp_path):
    # (data.overflow / data.format are closed choices, refused at composition: tests/config/test_trainer_args.py)
    cfg = DataConfig(train_path=str(tmp_path / "nope.json"),
                     sources=[DataSourceConfig(path=str(tmp_path / "x.txt"), weight=-1, format="csv")])
    (tmp_path / "x.txt").write_text("")
    problems = "\n".join(check_data(cfg))
    for fragment in ("nope.json", "unknown file type", "weight=-1", "format='csv'"):
        assert fragment in problems


def test_doctor_on_hf_sources(hf_dir, tmp_path, capsys):
    from collections import Counter

    from llava_train.config import ModelConfig
    from llava_train.config.jobs import DoctorConfig, DoctorJobConfig
    from llava_train.inspection.doctor import doctor

    data = DataConfig(sources=[DataSourceConfig(path=str(hf_dir / "train.parquet"), weight=2.0),
                               DataSourceConfig(path=str(hf_dir / "messages.parquet"), format="messages")])
    cfg = DoctorJobConfig(model=ModelConfig(path="tiny"), data=data,
                          doctor=DoctorConfig(workers=1, plot=str(tmp_path / "d.png")))
    (report,) = doctor(cfg, str(tmp_path))
    assert report.ok and report.samples == 5
    assert report.images_per_sample == Counter({1: 4, 0: 1})
    # " red</s>" twice per epoch for the parquet rows (weight 2), " blue</s>" once for the messages rows
    assert report.trained_tokens == 2 * 3 * 2 + 2 * 2
    assert "text-only: 1 (20.0%)" in capsys.readouterr().out


def _same_items(lazy, eager):
    import torch

    assert len(lazy) == len(eager)
    for i in range(len(eager)):
        a, b = eager[i], lazy[i]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        assert a.get("image_sizes") == b.get("image_sizes")
        assert all(torch.equal(x, y) for x, y in zip(a.get("pixel_values", []), b.get("pixel_values", [])))
    assert lazy.has_image.tolist() == [bool(conv.images) for conv, _ in eager.items]


@pytest.mark.parametrize("kind", ["saved", "parquet", "messages", "mix"])
def test_lazy_dataset_equals_eager_for_every_source_kind(kind, hf_dir, encoder, processor):
    from llava_train.data.index import LazyConversationDataset

    if kind == "mix":
        cfg = DataConfig(lazy_index_cache=False, sources=[
            DataSourceConfig(path=str(hf_dir / "train.parquet"), weight=1.5),
            DataSourceConfig(path=str(DEMO / "eval.json"), weight=0.1),
            DataSourceConfig(path=str(hf_dir / "messages.parquet"), weight=1.0, format="messages")])
        path = ""
    else:
        path = str(hf_dir / {"saved": "saved", "parquet": "train.parquet", "messages": "messages.parquet"}[kind])
        cfg = DataConfig(train_path=path, format="messages" if kind == "messages" else "auto")
    lazy = LazyConversationDataset(path, cfg, encoder, processor.image_processor)
    _same_items(lazy, ConversationDataset(path, cfg, encoder, processor.image_processor))
    assert (lazy.lengths > 0).all() and lazy.skipped.total == 0


def test_arrow_image_bytes_are_never_held_in_python(tmp_path, encoder, processor):
    """Building the training dataset over a parquet file with embedded images allocates (Python and
    Arrow heap) a small fraction of the image payload: the bytes stay memory-mapped until a fetch."""
    import tracemalloc

    import numpy as np
    import pyarrow as pa

    from llava_train.data.index import LazyConversationDataset

    rng = np.random.default_rng(0)
    images = []
    for _ in range(120):  # incompressible 96x96 PNGs, ~27 KB each
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
    payload = sum(len(im["bytes"]) for im in images)
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "noise"}]
    features = datasets.Features({"image": datasets.Image(), "conversations": datasets.List(
        {"from": datasets.Value("string"), "value": datasets.Value("string")})})
    path = str(tmp_path / "noise.parquet")
    datasets.Dataset.from_dict({"image": images, "conversations": [turns] * len(images)},
                               features=features).to_parquet(path)
    del images
    cfg = DataConfig(train_path=path)
    LazyConversationDataset(path, cfg, encoder, processor.image_processor)  # first load: HF's Arrow cache

    def allocated(build):
        arrow_before = pa.total_allocated_bytes()
        tracemalloc.start()
        ds = build()
        python_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return ds, python_peak, pa.total_allocated_bytes() - arrow_before

    lazy, python_peak, arrow_held = allocated(
        lambda: LazyConversationDataset(path, cfg, encoder, processor.image_processor))
    assert python_peak < payload / 4 and arrow_held < payload / 4, (python_peak, arrow_held, payload)
    assert lazy.has_image.all() and lazy[7]["image_sizes"] == [[96, 96]]
    # the measure sees materialised bytes: the exact (eval) dataset keeps them in its conversations
    _, eager_peak, _ = allocated(lambda: ConversationDataset(path, cfg, encoder, processor.image_processor))
    assert eager_peak > payload


def test_arrow_estimates_do_not_depend_on_the_read_batch(hf_dir, encoder, processor, monkeypatch):
    from llava_train.data import index

    path = str(hf_dir / "train.parquet")
    cfg = DataConfig(train_path=path)
    whole = index.LazyConversationDataset(path, cfg, encoder, processor.image_processor)
    monkeypatch.setattr(index.ArrowRows, "BATCH", 2)  # rows read in slices of 2
    sliced = index.LazyConversationDataset(path, cfg, encoder, processor.image_processor)
    assert sliced.lengths.tolist() == whole.lengths.tolist() and sliced.has_image.all()
