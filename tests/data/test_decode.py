"""Bad data through pixel decoding: a sample whose pixels fail is a counted, named skip (replaced so the
batch still forms) or an error naming file, sample and field; images open only as allow-listed formats
whose content and extension agree; special files are refused without blocking; 16-bit and float images
keep their range; malformed rows (non-string image fields, non-UTF-8, deep nesting) name the sample."""

import io
import json
import os
import signal
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from llava_train.config import DataConfig
from llava_train.data.collate import Collator
from llava_train.data.dataset import ConversationDataset
from llava_train.data.formats import Conversation, DataError, read_rows
from llava_train.data.images import load_rgb


def _turns(q="<image>\nWhat colour?", a="red"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def _jpeg(colour=(200, 10, 10), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    (root / "ok.jpg").write_bytes(_jpeg())
    full = _jpeg(size=(320, 240))
    (root / "cut.jpg").write_bytes(full[: len(full) // 2])  # intact header, pixel data cut
    return root


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _dataset(path, images, processor, encoder, **kw):
    cfg = DataConfig(train_path=str(path), image_root=str(images), **kw)
    return ConversationDataset(str(path), cfg, encoder, processor.image_processor)


def test_truncated_pixels_are_a_counted_named_skip_and_the_batch_forms(images, processor, encoder, tmp_path):
    rows = [{"id": "a", "image": "ok.jpg", "conversations": _turns()},
            {"id": "cut", "image": "cut.jpg", "conversations": _turns()},
            {"id": "b", "image": "ok.jpg", "conversations": _turns(a="blue")}]
    path = _write(tmp_path / "d.jsonl", rows)
    ds = _dataset(path, images, processor, encoder, on_error="skip")
    assert len(ds) == 3 and ds.skipped.total == 0  # the header is intact: indexing cannot see it
    collate = Collator(pad_token_id=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate)
    batches = list(loader)  # batch size 1 and a bad sample: no crash, the next sample replaces it
    assert len(batches) == 3 and all(b["input_ids"].shape[0] == 1 and "pixel_values" in b for b in batches)
    assert torch.equal(batches[1]["input_ids"], batches[2]["input_ids"])  # #1 replaced by #2
    report = ds.skipped  # counted in a worker, seen here
    assert report.counts == Counter(corrupt_image=1) and report.ids["corrupt_image"] == ["cut"]
    summary = report.summary()
    assert "corrupt_image: 1" in summary and "id 'cut'" in summary and "field 'image[0]'" in summary
    assert str(path) in summary

    strict = _dataset(path, images, processor, encoder)
    with pytest.raises(DataError, match=r"file .*d.jsonl, sample #1, id 'cut', field 'image\[0\]': corrupt or "
                                        r"truncated pixel data") as err:
        strict[1]
    assert err.value.kind == "corrupt_image"


def test_every_sample_failing_is_an_error_not_a_loop(images, processor, encoder, tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"id": f"c{i}", "image": "cut.jpg", "conversations": _turns()}
                                         for i in range(3)])
    ds = _dataset(path, images, processor, encoder, on_error="skip")
    with pytest.raises(DataError, match="3 consecutive samples from #0 failed"):
        ds[0]


def _conv():
    return Conversation(id="s1", turns=[], source="data.jsonl", index=7)


@pytest.mark.parametrize("name,payload,message", [
    ("fake.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", r"is not a PNG image as its extension says"),
    ("png_named.jpg", "PNG", r"is not a JPEG image as its extension says"),
    ("picture.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n", r"extension '.eps', not one of the allowed image formats"),
    ("picture.pdf", "PNG", r"extension '.pdf', not one of the allowed"),
])
def test_only_allowed_formats_whose_content_matches_the_extension(tmp_path, name, payload, message):
    if payload == "PNG":
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="PNG")
        payload = buf.getvalue()
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(DataError, match=r"data.jsonl, sample #7, id 's1', field 'image\[0\]': .*" + message) as err:
        load_rgb(name, tmp_path, _conv(), 0)
    assert err.value.kind == "bad_image_format"


def test_bytes_open_only_as_allowed_formats(tmp_path):
    with pytest.raises(DataError, match="not an image in an allowed format"):
        load_rgb(b"%!PS-Adobe-3.0 EPSF-3.0\n", tmp_path, _conv(), 0)
    assert load_rgb(_jpeg(), tmp_path, _conv(), 0).size == (64, 48)
    extensionless = tmp_path / "0a1b2c"  # hashed names without an extension: content decides (allow-list)
    extensionless.write_bytes(_jpeg())
    assert load_rgb("0a1b2c", tmp_path, _conv(), 0).size == (64, 48)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_files_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "folder.png").mkdir()
    old = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("opening a FIFO blocked"))
    signal.alarm(20)
    try:
        for name in ("pipe.png", "folder.png", "/dev/zero"):
            with pytest.raises(DataError, match="is not a regular file") as err:
                load_rgb(name, tmp_path, _conv(), 0)
            assert err.value.kind == "not_a_file"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_16_bit_and_float_images_keep_their_range(tmp_path):
    ramp = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    grey = np.asarray(load_rgb("deep.png", tmp_path, _conv(), 0))[..., 0]
    assert len(np.unique(grey)) > 200  # PIL's own convert leaves ~2 levels
    assert grey.min() == 0 and grey.max() == 255 and abs(int(grey.flat[128]) - round(ramp.flat[128] / 257)) <= 1

    unit = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    Image.fromarray(unit).save(tmp_path / "unit.tiff")
    grey = np.asarray(load_rgb("unit.tiff", tmp_path, _conv(), 0))[..., 0]
    assert grey.max() == 255 and len(np.unique(grey)) > 200  # not black

    eight = np.arange(256, dtype=np.float32).reshape(16, 16)  # float holding 0..255 stays as is
    Image.fromarray(eight).save(tmp_path / "eight.tif")
    assert np.array_equal(np.asarray(load_rgb("eight.tif", tmp_path, _conv(), 0))[..., 0], eight.astype(np.uint8))


@pytest.mark.parametrize("image", [5, [["a.png"]], [None], {"width": 3}])
def test_non_string_image_fields_name_the_sample(tmp_path, processor, encoder, image):
    kind = "bad_image_ref"
    path = _write(tmp_path / "d.jsonl", [{"id": "n1", "image": image, "conversations": _turns()}])
    with pytest.raises(DataError, match=r"sample #0, id 'n1', field 'image': image 0 is .*an image must be a path") \
            as err:
        _dataset(path, tmp_path, processor, encoder)
    assert err.value.kind == kind
    skip = _write(tmp_path / "s.jsonl", [{"id": "n1", "image": image, "conversations": _turns()},
                                         {"id": "ok", "conversations": _turns(q="Hi?")}])
    assert _dataset(skip, tmp_path, processor, encoder, on_error="skip").skipped.counts == Counter({kind: 1})


def test_latin1_and_deep_nesting_are_clear_errors(tmp_path):
    good = json.dumps({"id": "g", "conversations": _turns(q="Hi")}).encode()
    latin = json.dumps({"id": "l1", "conversations": _turns(q="caf\u00e9")}, ensure_ascii=False).encode("latin-1")
    deep = b'{"id": "d1", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join([good, latin, deep]) + b"\n")
    rows = dict(read_rows(path))
    assert rows[0]["id"] == "g"
    assert isinstance(rows[1], DataError) and rows[1].kind == "bad_encoding"
    assert "sample #1: line 2 is not UTF-8" in str(rows[1]) and "re-encode it as UTF-8" in str(rows[1])
    assert isinstance(rows[2], DataError) and rows[2].kind == "too_deep" and "sample #2" in str(rows[2])

    whole = tmp_path / "d.json"
    whole.write_bytes(b"[" + latin + b"]")
    with pytest.raises(DataError, match=r"d.json: the file is not UTF-8 .*Latin-1"):
        list(read_rows(whole))


def test_jsonl_splits_on_newline_only(tmp_path):
    texts = ["a\u2028b", "c\u0085d", "e\u2029f\x0bg\x0ch\x1ci"]  # all str.splitlines() separators
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"id": k, "conversations": _turns(q=t)}, ensure_ascii=False)
                              for k, t in enumerate(texts)) + "\r\n", encoding="utf-8")
    rows = list(read_rows(path))
    assert [r["conversations"][0]["value"] for _, r in rows] == texts
