"""Every kind of bad input gets a clear error naming the sample, the file and the field and saying
what to do; with data.on_error=skip the same samples are skipped and counted by kind."""

import json
import logging
import struct
import zlib
from collections import Counter

import pytest
import torch
from PIL import Image

from llava_train.config import DataConfig
from llava_train.data.dataset import ConversationDataset
from llava_train.data.encoder import Encoder
from llava_train.data.formats import DataError


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims a size, with no pixel data (enough for header-only readers)."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    end = b"IEND"
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
            + struct.pack(">I", 0) + end + struct.pack(">I", zlib.crc32(end)))


def _turns(q="<image>\nWhat colour?", a="red"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


# kind, row (or raw line), expected message fragment
BAD = [
    ("missing_image", {"id": "m1", "image": "nope.png", "conversations": _turns()},
     r"id 'm1', field 'image\[0\]': image file .*nope.png not found; check data.image_root"),
    ("corrupt_image", {"id": "c1", "image": "corrupt.png", "conversations": _turns()},
     r"id 'c1', field 'image\[0\]': unreadable or corrupt image .*; re-encode or remove it"),
    ("image_too_large", {"id": "b1", "image": "huge.png", "conversations": _turns()},
     r"id 'b1', field 'image\[0\]': image is 9000x9000 = 81000000 pixels, over the 64000000 limit"),
    ("image_too_large", {"id": "b2", "image": "bomb.png", "conversations": _turns()},
     r"id 'b2', field 'image\[0\]': .*decompression bomb.*downscale it"),
    ("placeholder_mismatch", {"id": "p1", "image": "ok.png", "conversations": _turns(q="What colour?")},
     r"id 'p1', field 'image': 0 <image> placeholder\(s\) but 1 image\(s\); each image needs exactly one"),
    ("placeholder_mismatch", {"id": "p2", "image": "ok.png", "conversations": _turns(q="<image><image>\nBoth?")},
     r"id 'p2', field 'image': 2 <image> placeholder\(s\) but 1 image\(s\)"),
    ("unknown_role", {"id": "r1", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
     r"id 'r1', field 'conversations': turn 0 has unknown role 'robot'; use one of"),
    ("unknown_role", {"id": "r2", "messages": [{"role": "narrator", "content": "hi"}]},
     r"id 'r2', field 'messages': message 0 has unknown role 'narrator'"),
    ("empty_reply", {"id": "e1", "conversations": _turns(q="Hi?", a="  ")},
     r"id 'e1'.*turn 1: empty assistant reply; remove the turn or fill it"),
    ("empty_reply", {"id": "e2", "conversations": [{"from": "human", "value": "Hi?"}]},
     r"id 'e2'.*the last turn is a user turn without an assistant reply"),
    ("bad_structure", {"id": "s1", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
     r"id 's1'.*starts with the assistant; it must start with a user turn"),
    ("bad_structure", {"id": "s2", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                                                     {"from": "gpt", "value": "c"}]},
     r"id 's2'.*turn 1 is 'user' but 'assistant' was expected: turns must alternate"),
    ("non_string_text", {"id": "t1", "conversations": _turns(q="How many?", a=42)},
     r"id 't1', field 'conversations': turn 1: text must be a string, got int"),
    ("path_escape", {"id": "x1", "image": "../outside.png", "conversations": _turns()},
     r"id 'x1', field 'image\[0\]': image path '../outside.png' escapes data.image_root"),
    ("malformed_json", '{"id": "j1", "conversations": [',
     r"sample #0: malformed JSON on line 1: .*; fix or remove that line"),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "data"
    root.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "ok.png")
    Image.new("RGB", (40, 30)).save(root.parent / "outside.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (root / "huge.png").write_bytes(png_header(9000, 9000))
    (root / "bomb.png").write_bytes(png_header(30000, 30000))
    # non-RGB modes: converted, not refused
    for mode in ("P", "L", "LA", "RGBA", "I;16", "1"):
        Image.new(mode, (30, 40)).save(root / f"mode_{mode.replace(';', '')}.png")
    Image.new("CMYK", (30, 40)).save(root / "mode_CMYK.jpg")
    return root


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("kind,row,message", BAD, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD)])
def test_bad_input_message(kind, row, message, data_dir, encoder, processor):
    path = _write(data_dir / f"one_{kind}.jsonl", [row])
    with pytest.raises(DataError, match=message) as err:
        ConversationDataset(str(path), DataConfig(train_path=str(path)), encoder, processor.image_processor)
    assert err.value.kind == kind
    assert str(path) in str(err.value)  # names the file


def test_on_error_skip_counts_every_kind(data_dir, encoder, processor):
    good = [{"id": f"g{i}", "image": "ok.png", "conversations": _turns()} for i in range(2)]
    good.append({"id": "abs", "image": str(data_dir / "ok.png"), "conversations": _turns()})  # absolute path
    path = _write(data_dir / "mixed.jsonl", good + [row for _, row, _ in BAD])
    cfg = DataConfig(train_path=str(path), on_error="skip")
    ds = ConversationDataset(str(path), cfg, encoder, processor.image_processor)
    assert len(ds) == 3 and ds[2]["image_sizes"] == [[30, 40]]
    assert ds.skipped.counts == Counter(kind for kind, _, _ in BAD)
    assert ds.skipped.ids["unknown_role"] == ["r1", "r2"]
    assert "placeholder_mismatch: 2" in ds.skipped.summary()


def test_non_rgb_modes_are_converted(data_dir, encoder, processor):
    images = sorted(p.name for p in data_dir.glob("mode_*"))
    rows = [{"id": name, "image": name, "conversations": _turns()} for name in images]
    path = _write(data_dir / "modes.jsonl", rows)
    ds = ConversationDataset(str(path), DataConfig(train_path=str(path)), encoder, processor.image_processor)
    assert len(ds) == len(images) == 7
    for i in range(len(ds)):
        item = ds[i]
        assert item["image_sizes"] == [[40, 30]]
        assert item["pixel_values"][0].shape[1] == 3 and torch.isfinite(item["pixel_values"][0]).all()


def test_too_long_follows_overflow_policy(data_dir, encoder, processor):
    rows = [{"id": "long", "conversations": _turns(q="word " * 400, a="x")},
            {"id": "short", "conversations": _turns(q="Hi?", a="x")}]
    path = _write(data_dir / "long.jsonl", rows)
    for policy in ("drop_turns", "skip", "error"):
        cfg = DataConfig(train_path=str(path), max_length=64, overflow=policy)
        enc = Encoder.from_config(encoder.tok, encoder.family, encoder.geometry, cfg)
        if policy == "error":
            with pytest.raises(DataError, match="id 'long'.*over data.max_length=64"):
                ConversationDataset(str(path), cfg, enc, processor.image_processor)
            continue
        ds = ConversationDataset(str(path), cfg, enc, processor.image_processor)
        assert len(ds) == 1 and ds.skipped.counts == Counter(too_long=1)


def test_the_run_reports_skips(data_dir, processor, caplog):
    """Training data is lazy: bad samples are found when fetched (in workers), counted, replaced, and the
    whole report (kinds, ids, messages) is what the end-of-run summary prints."""
    from llava_train.config import ModelConfig
    from llava_train.data.collate import Collator
    from llava_train.train.recipe import build_datasets

    path = _write(data_dir / "run.jsonl", [{"id": "g", "image": "ok.png", "conversations": _turns()}]
                  + [row for kind, row, _ in BAD if kind in ("missing_image", "unknown_role")])
    caplog.set_level(logging.INFO, logger="llava_train")
    train, _ = build_datasets(DataConfig(train_path=str(path), on_error="skip", lazy_index_cache=False),
                              ModelConfig(path="tiny"), processor)
    assert "train: 4 samples" in caplog.text
    loader = torch.utils.data.DataLoader(train, batch_size=2, num_workers=2, collate_fn=Collator(pad_token_id=0))
    assert [b["input_ids"].shape[0] for b in loader] == [2, 2]  # every bad one replaced by the good one
    summary = train.skipped.summary()
    assert "3 sample(s) skipped" in summary and "missing_image: 1" in summary and "unknown_role: 2" in summary
    assert train.skipped.ids["unknown_role"] == ["r1", "r2"]
