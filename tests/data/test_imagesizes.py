"""Image sizes for the length plan: header reader == PIL, every record kind sized like a fetch sizes it,
parallel == in-process, cached, unreadable images counted at the assumed size and named; lazy length
estimates then differ between samples exactly as their true lengths do."""

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from llava_train.config import DataConfig
from llava_train.data import imagesizes, index
from llava_train.data.dataset import ConversationDataset
from llava_train.data.images import ImageGeometry, num_image_tokens
from llava_train.data.imagesizes import header_sizes, image_tokens, jpeg_or_png_hw
from llava_train.data.index import LazyConversationDataset, LazyIndex


def _encoded(size, fmt, **kw) -> bytes:
    mode = kw.pop("mode", "RGB")
    img = Image.new(mode, size, color=(10, 20, 30) if mode in ("RGB", "RGBA") else 7)
    if "exif" in kw:  # a large APP1 segment (thumbnail-sized) before the frame header
        exif = Image.Exif()
        exif[0x010E] = "x" * kw.pop("exif")  # ImageDescription
        kw["exif"] = exif.tobytes()
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


CASES = [
    ((640, 480), "JPEG", {}),
    ((333, 517), "JPEG", {"progressive": True}),
    ((200, 100), "JPEG", {"exif": 30_000}),
    ((123, 45), "JPEG", {"mode": "L"}),
    ((77, 99), "JPEG", {"mode": "CMYK"}),
    ((64, 48), "JPEG", {"icc_profile": b"\0" * 5000}),
    ((301, 200), "PNG", {}),
    ((31, 20), "PNG", {"mode": "RGBA"}),
    ((31, 20), "PNG", {"mode": "I;16"}),
    ((50, 60), "PNG", {"mode": "P"}),
]


@pytest.mark.parametrize("size,fmt,kw", CASES)
def test_header_reader_equals_pil(size, fmt, kw):
    data = _encoded(size, fmt, **dict(kw))
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == size
    assert jpeg_or_png_hw(data[: imagesizes.HEAD_BYTES]) == (size[1], size[0])


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "BMP", "TIFF"])
def test_other_formats_are_left_to_pil(fmt):
    assert jpeg_or_png_hw(_encoded((40, 30), fmt)) is None
    assert jpeg_or_png_hw(b"\xff\xd8\xff\xda\x00\x08" + b"\0" * 20) is None  # scan before any frame header
    assert jpeg_or_png_hw(b"\xff\xd8\xff\xe0\x00\x10JFIF") is None  # cut before the frame header


def _write_set(tmp_path):
    """Records of every kind with (width, height) of their images (None: text only; 'missing')."""
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    files = {"a.jpg": ((640, 480), "JPEG"), "sub/b.png": ((300, 700), "PNG"), "c.webp": ((500, 500), "WEBP"),
             "d.jpg": ((1000, 200), "JPEG")}
    for name, (size, fmt) in files.items():
        (root / name).write_bytes(_encoded(size, fmt))
    conv = [{"from": "human", "value": "<image>\nwhat is this?"}, {"from": "gpt", "value": "a test"}]
    rows, truth = [], []
    for k in range(3):
        for name in ("a.jpg", "sub/b.png", "c.webp", "d.jpg"):  # fast path (JPEG, PNG) and PIL (WEBP)
            rows.append({"id": f"{name}-{k}", "image": name, "conversations": conv})
            truth.append([files[name][0]])
        rows.append({"id": f"t{k}", "conversations": [{"from": "human", "value": "hi"},
                                                      {"from": "gpt", "value": "yo"}]})
        truth.append(None)
        rows.append({"id": f"m{k}", "images": [str(root / "d.jpg"), "sub/b.png"],  # messages, two images
                     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                               {"type": "text", "text": "compare"}]},
                                  {"role": "assistant", "content": "the first is wider"}]})
        truth.append([files["d.jpg"][0], files["sub/b.png"][0]])
        rows.append({"id": f"x{k}", "image": "nope.jpg", "conversations": conv})
        truth.append("missing")
    rows.append({"id": "dots", "image": "sub/../a.jpg", "conversations": conv})  # normalised, inside the root
    truth.append([files["a.jpg"][0]])
    (tmp_path / "outside.jpg").write_bytes(_encoded((64, 64), "JPEG"))
    rows.append({"id": "escape", "image": "../outside.jpg", "conversations": conv})  # exists, but not read
    truth.append("missing")
    (root / "png.jpg").write_bytes(_encoded((64, 64), "PNG"))  # the fetch refuses a PNG named .jpg
    rows.append({"id": "misnamed", "image": "png.jpg", "conversations": conv})
    truth.append("missing")
    (root / "noext").write_bytes(_encoded((70, 30), "PNG"))  # no extension: any allowed format
    rows.append({"id": "noext", "image": "noext", "conversations": conv})
    truth.append([(70, 30)])
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(rows))
    return path, root, truth


@pytest.mark.parametrize("processes,task_records", [(1, 32_768), (2, 3)])
def test_sizes_of_every_record_kind(tmp_path, monkeypatch, caplog, processes, task_records):
    monkeypatch.setattr(imagesizes, "TASK_RECORDS", task_records)
    path, root, truth = _write_set(tmp_path)
    idx = LazyIndex(path, image_tokens=1)
    with caplog.at_level(logging.WARNING, logger="llava_train.data.imagesizes"):
        found = header_sizes(path, idx.offsets, idx.sizes, np.flatnonzero(idx.has_image), fmt="auto",
                             image_root=root, processes=processes)
    geo = ImageGeometry(image_size=28, patch_size=14, grid_pinpoints=((28, 56), (56, 28), (56, 56)))
    tokens = image_tokens(found, len(idx), geo)
    want = [0 if t is None else -1 if t == "missing" else sum(num_image_tokens(h, w, geo) for w, h in t)
            for t in truth]
    assert tokens.tolist() == want
    assert "5 of 22 samples with images" in caplog.text and "nope.jpg" in caplog.text and str(path) in caplog.text


def test_lazy_lengths_differ_as_true_lengths_do(tmp_path, processor, encoder):
    """Same text, images of different shapes: estimates differ by the true image-token difference; with
    data.image_sizes=assumed they are all equal (what grouping saw before)."""
    root = tmp_path
    conv = [{"from": "human", "value": "<image>\ndescribe the picture"}, {"from": "gpt", "value": "it is a picture"}]
    rows = []
    for k, size in enumerate([(640, 480), (480, 640), (1280, 720), (500, 500), (200, 900)]):
        (root / f"{k}.jpg").write_bytes(_encoded(size, "JPEG"))
        rows.append({"id": str(k), "image": f"{k}.jpg", "conversations": conv})
    path = tmp_path / "shapes.json"
    path.write_text(json.dumps(rows))
    cfg = DataConfig(train_path=str(path), lazy_index_cache=False)
    true = np.asarray(ConversationDataset(str(path), cfg, encoder, processor.image_processor).lengths)
    est = LazyConversationDataset(str(path), cfg, encoder, processor.image_processor).lengths
    assert len(set(true.tolist())) > 2
    assert (est - est[0]).tolist() == (true - true[0]).tolist()
    cfg.image_sizes = "assumed"
    assumed = LazyConversationDataset(str(path), cfg, encoder, processor.image_processor).lengths
    assert len(set(assumed.tolist())) == 1


def test_sizes_cached_next_to_the_file(tmp_path, monkeypatch, processor, encoder):
    path, root, _ = _write_set(tmp_path)
    cfg = DataConfig(train_path=str(path), image_root=str(root))
    first = LazyConversationDataset(str(path), cfg, encoder, processor.image_processor).lengths
    assert (tmp_path / "mix.json.imagesizes.npz").exists()

    def fail(*a, **k):
        raise AssertionError("headers read again")

    monkeypatch.setattr(index, "header_sizes", fail)
    again = LazyConversationDataset(str(path), cfg, encoder, processor.image_processor).lengths
    assert again.tolist() == first.tolist()
    cfg.image_root = str(tmp_path)  # other root, other sizes: the cache does not answer
    with pytest.raises(AssertionError, match="headers read again"):
        LazyConversationDataset(str(path), cfg, encoder, processor.image_processor)


def _parquet(tmp_path, rows, schema=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "mix.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("kind", ["struct", "list_of_structs", "paths"])
def test_arrow_sizes_read_embedded_bytes_in_place(tmp_path, caplog, kind, chunked):
    import pyarrow as pa

    from llava_train.data.imagesizes import arrow_sizes
    from llava_train.data.sources import Source, load_hf

    shapes = [(640, 480), (300, 700), (500, 500), (1000, 200), (90, 60)]
    fmts = ["JPEG", "PNG", "JPEG", "PNG", "WEBP"]  # WEBP: not read in place, sized through the fetch path
    blobs = [_encoded(s, f) for s, f in zip(shapes, fmts)]
    names = [f"{k}.{f.lower()}" for k, f in enumerate(fmts)]
    for name, b in zip(names, blobs):
        (tmp_path / name).write_bytes(b)
    conv = [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "that"}]
    rows, want = [], []
    for k in range(len(blobs)):
        if kind == "struct":
            rows.append({"id": str(k), "image": {"bytes": blobs[k], "path": None}, "conversations": conv})
            want.append([shapes[k]])
        elif kind == "paths":
            rows.append({"id": str(k), "image": names[k], "conversations": conv})
            want.append([shapes[k]])
        else:
            j = (k + 1) % len(blobs)
            rows.append({"id": str(k), "images": [{"bytes": blobs[k], "path": None}, {"bytes": blobs[j], "path": None}],
                         "messages": [{"role": "user", "content": "<image><image>compare"},
                                      {"role": "assistant", "content": "same"}]})
            want.append([shapes[k], shapes[j]])
    rows.append({**rows[0], "id": "text"} | ({"image": None} if kind != "list_of_structs" else {"images": []}))
    want.append([])
    if kind != "list_of_structs":  # a broken image: counted at the assumed size and named
        rows.append({**rows[0], "id": "bad"} | ({"image": {"bytes": b"\xff\xd8\xffjunk", "path": None}}
                                                 if kind == "struct" else {"image": "nope.jpg"}))
        want.append(None)
    path = _parquet(tmp_path, rows)
    ds = load_hf(Source(str(path)))
    if chunked:  # Arrow data in chunks of 2 rows (big image columns come in chunks; offsets are per chunk)
        from datasets import Dataset
        from datasets.table import InMemoryTable

        table = ds.data.table
        ds = Dataset(InMemoryTable(pa.concat_tables([table.slice(i, 2) for i in range(0, len(ds), 2)])))
        assert ds.data.table.column(0).num_chunks > 1
    with caplog.at_level(logging.WARNING, logger="llava_train.data.imagesizes"):
        found = arrow_sizes(ds, fmt="auto", image_root=tmp_path, source=str(path), batch=3)
    geo = ImageGeometry(image_size=28, patch_size=14, grid_pinpoints=((28, 56), (56, 28), (56, 56)))
    tokens = image_tokens(found, len(ds), geo)
    assert tokens.tolist() == [-1 if w is None else sum(num_image_tokens(h, wd, geo) for wd, h in w) for w in want]
    if kind != "list_of_structs":
        assert "1 of" in caplog.text and "#" + str(len(rows) - 1) in caplog.text


def test_arrow_lazy_lengths_differ_as_true_lengths_do(tmp_path, monkeypatch, processor, encoder):
    conv = [{"from": "human", "value": "<image>\ndescribe the picture"}, {"from": "gpt", "value": "it is a picture"}]
    rows = [{"id": str(k), "image": {"bytes": _encoded(s, "JPEG"), "path": None}, "conversations": conv}
            for k, s in enumerate([(640, 480), (480, 640), (1280, 720), (500, 500), (200, 900)])]
    path = _parquet(tmp_path, rows)
    cfg = DataConfig(train_path=str(path))
    true = np.asarray(ConversationDataset(str(path), cfg, encoder, processor.image_processor).lengths)
    est = LazyConversationDataset(str(path), cfg, encoder, processor.image_processor).lengths
    assert len(set(true.tolist())) > 2
    assert (est - est[0]).tolist() == (true - true[0]).tolist()

    def fail(*a, **k):
        raise AssertionError("headers read again")

    monkeypatch.setattr(index, "arrow_sizes", fail)  # a restart: the sizes come from next to the Arrow files
    again = LazyConversationDataset(str(path), cfg, encoder, processor.image_processor).lengths
    assert again.tolist() == est.tolist()
