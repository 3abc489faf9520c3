"""Lazy index: exact record boundaries from a raw-byte scan (JSON list and JSONL, tricky strings), cheap
length estimates, items equal to the eager dataset's, fetch errors counted or raised."""

import json

import pytest
import torch

from conftest import DEMO
from llava_train.config import DataConfig
from llava_train.constants import INPUT_IDS, LABELS, PIXEL_VALUES
from llava_train.data import jsonscan
from llava_train.data.dataset import ConversationDataset
from llava_train.data.formats import DataError
from llava_train.data.index import LazyConversationDataset, LazyIndex

TRICKY = [
    {"id": "a", "image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\nbraces } { and \"quotes\""},
                                                    {"from": "gpt", "value": "back\\slash\\\\\" ünïcödé 🙂 }"}]},
    {"id": "b", "conversations": [{"from": "human", "value": "text only [ ] {{"},
                                  {"from": "gpt", "value": "\\\\"}]},
    {"id": "c", "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
                             {"role": "assistant", "content": "ok"}], "images": ["y.png"]},
]


@pytest.mark.parametrize("suffix,ascii_only", [(".json", True), (".json", False), (".jsonl", False)])
@pytest.mark.parametrize("chunk,range_bytes", [(7, 1 << 30), (1 << 20, 1 << 30), (5, 23), (64, 101)])
def test_boundaries_exact(tmp_path, monkeypatch, suffix, ascii_only, chunk, range_bytes):
    # records, strings, keys and escapes straddle chunk borders and the borders of the ranges scanned in
    # parallel (2 processes)
    monkeypatch.setattr(jsonscan, "CHUNK", chunk)
    monkeypatch.setattr(jsonscan, "RANGE_BYTES", range_bytes)
    monkeypatch.setattr(jsonscan, "MAX_PROCESSES", 2)
    rows = TRICKY * 5
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r, ensure_ascii=ascii_only) for r in rows) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, ensure_ascii=ascii_only, indent=1), encoding="utf-8")
    idx = LazyIndex(path, image_tokens=100)
    assert len(idx) == len(rows)
    with open(path, "rb") as f:
        assert [idx.read(f, i) for i in range(len(rows))] == rows
    assert idx.has_image.tolist() == [True, False, True] * 5
    assert (idx.lengths[0::3] > 99).all() and (idx.lengths[1::3] < 50).all()


def test_truncated_file_is_an_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(TRICKY)[:-30])
    with pytest.raises(DataError, match="unbalanced JSON"):
        LazyIndex(path, image_tokens=10)


def test_items_equal_eager(processor, encoder):
    path = str(DEMO / "eval.json")
    cfg = DataConfig(train_path=path)
    eager = ConversationDataset(path, cfg, encoder, processor.image_processor)
    lazy = LazyConversationDataset(path, DataConfig(train_path=path, lazy_image_hw=[40, 30], lazy_index_cache=False),
                                   encoder, processor.image_processor)  # no cache file next to the repo's data
    assert len(lazy) == len(eager)
    for i in (0, 5, len(eager) - 1):
        a, b = eager[i], lazy[i]
        assert torch.equal(a[INPUT_IDS], b[INPUT_IDS]) and torch.equal(a[LABELS], b[LABELS])
        assert all(torch.equal(x, y) for x, y in zip(a.get(PIXEL_VALUES, []), b.get(PIXEL_VALUES, [])))


def test_estimates_track_true_lengths(tmp_path, processor, encoder):
    words = "the man is sitting next to a red car on the street while two dogs play in the park".split()
    rows = [{"id": str(n), "conversations": [{"from": "human", "value": " ".join(words[: 5 + n % 10]) + "?"},
                                             {"from": "gpt", "value": " ".join(words * (1 + n))}]}
            for n in range(0, 40, 3)]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(rows))
    cfg = DataConfig(train_path=str(path))
    true = ConversationDataset(str(path), cfg, encoder, processor.image_processor).lengths
    est = LazyConversationDataset(str(path), cfg, encoder, processor.image_processor).lengths.tolist()
    assert all(abs(e - t) <= 0.25 * t + 10 for e, t in zip(est, true)), list(zip(est, true))
    assert sorted(range(len(est)), key=est.__getitem__) == sorted(range(len(true)), key=true.__getitem__)


def test_fetch_errors_counted_or_raised(tmp_path, processor, encoder):
    rows = json.loads((DEMO / "eval.json").read_text())[:4]
    rows[1]["image"] = "does/not/exist.png"
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    cfg = DataConfig(train_path=str(path), image_root=str(DEMO), on_error="skip")
    ds = LazyConversationDataset(str(path), cfg, encoder, processor.image_processor)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, collate_fn=list)
    assert len(next(iter(loader))) == 4  # the batch keeps its size
    assert ds.skipped.counts["missing_image"] == 1  # counted in the worker, visible here
    assert ds.skipped.ids["missing_image"] == [rows[1]["id"]]
    replaced = ds[1]  # replaced by the next sample that works
    assert torch.equal(replaced["input_ids"], ds[2]["input_ids"])
    assert ds.skipped.counts["missing_image"] == 1  # the same sample counts once
    strict = LazyConversationDataset(str(path), DataConfig(train_path=str(path), image_root=str(DEMO)), encoder,
                                     processor.image_processor)
    with pytest.raises(DataError, match="not found"):
        strict[1]


def test_cache_reused_and_invalidated(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(TRICKY))
    first = LazyIndex(path, image_tokens=10, cache=True)
    cache = tmp_path / "d.json.lazyindex.npz"
    assert cache.exists()
    again = LazyIndex(path, image_tokens=10, cache=True)
    assert again.offsets.tolist() == first.offsets.tolist() and again.lengths.tolist() == first.lengths.tolist()
    path.write_text(json.dumps(TRICKY[:2]))  # changed file: the cache is rebuilt
    assert len(LazyIndex(path, image_tokens=10, cache=True)) == 2


def test_malformed_jsonl_line_is_one_counted_record(tmp_path, processor, encoder):
    rows = json.loads((DEMO / "eval.json").read_text())[:3]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + '{"id": "cut", "conversations": [{"from": "hu\n  \r\n'
                    + "\n".join(json.dumps(r) for r in rows[1:]) + "\n\n")
    cfg = DataConfig(train_path=str(path), image_root=str(DEMO), on_error="skip", lazy_index_cache=False)
    ds = LazyConversationDataset(str(path), cfg, encoder, processor.image_processor)
    assert len(ds) == 4  # blank lines are not records; the cut one is
    items = [ds[i] for i in range(4)]
    assert torch.equal(items[1]["input_ids"], items[2]["input_ids"])  # the cut record replaced by the next
    assert ds.skipped.counts == {"malformed_json": 1}


def test_a_batch_fetched_by_threads_equals_one_by_one(tmp_path, processor, encoder):
    # several threads read rows (pread on one handle), decode and process images and encode at once: the
    # items are those of a one-by-one fetch, in order, and a bad sample is counted once and replaced as there
    import threading

    rows = json.loads((DEMO / "train.json").read_text())[:24]
    rows[5]["image"] = "does/not/exist.png"
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    items, names = {}, set()
    for threads in (1, 3):
        cfg = DataConfig(train_path=str(path), image_root=str(DEMO), on_error="skip", fetch_threads=threads,
                         lazy_index_cache=False)
        ds = LazyConversationDataset(str(path), cfg, encoder, processor.image_processor)
        fetch = ds._fetch
        ds._fetch = lambda i, fetch=fetch: (names.add(threading.current_thread().name), fetch(i))[1]
        items[threads] = ds.__getitems__(list(range(24))) + ds.__getitems__([5, 5, 23])
        assert ds.skipped.counts["missing_image"] == 1 and ds.skipped.ids["missing_image"] == [rows[5]["id"]]
    assert any(n.startswith("llava-fetch") for n in names)  # the 3-thread pass did use the pool
    assert len(items[1]) == len(items[3]) == 27
    for a, b in zip(items[1], items[3]):
        assert a.keys() == b.keys()
        assert torch.equal(a[INPUT_IDS], b[INPUT_IDS]) and torch.equal(a[LABELS], b[LABELS])
        assert all(torch.equal(x, y) for x, y in zip(a.get(PIXEL_VALUES, []), b.get(PIXEL_VALUES, [])))


class _ThreadsSeen(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        from llava_train.data.dataset import fetch_threads

        return fetch_threads(DataConfig())


def test_fetch_threads_auto_uses_the_idle_compute_cores_in_process_only():
    from llava_train.data.dataset import fetch_threads

    assert fetch_threads(DataConfig()) == torch.get_num_threads()  # in the training process
    assert fetch_threads(DataConfig(fetch_threads=3)) == 3
    in_worker = torch.utils.data.DataLoader(_ThreadsSeen(), batch_size=2, num_workers=1)
    assert next(iter(in_worker)).tolist() == [1, 1]  # a DataLoader worker fetches one sample at a time
