"""Streaming over local WebDataset tar shards: every sample exactly once per epoch over 2 ranks x 2
DataLoader workers; resuming mid-epoch continues with the next unseen batch; length grouping inside
the window; bad samples counted."""

import io
import json
import re
import tarfile

import pytest
from PIL import Image

from llava_train.config import DataConfig
from llava_train.data.sources import Source
from llava_train.data.streaming import StreamingDataset, StreamingLoader

SHARDS, PER_SHARD = 4, 6


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (30 + colour % 20, 20), (colour, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    for s in range(SHARDS):
        with tarfile.open(root / f"shard-{s:02d}.tar", "w") as tar:
            for k in range(PER_SHARD):
                n = s * PER_SHARD + k
                q = ("<image>\n" if n % 3 else "") + f"Which sample is this? sample{n:03d} " + "more " * (n % 7)
                record = {"id": f"s{n:03d}", "conversations": [{"from": "human", "value": q},
                                                                {"from": "gpt", "value": f"number {n}"}]}
                _add(tar, f"{n:05d}.json", json.dumps(record).encode())
                if n % 3:
                    _add(tar, f"{n:05d}.png", b"broken" if n == 13 else _png(n))
    return str(root / "shard-*.tar")


def _ids(tokenizer, batch) -> list[str]:
    return [re.search(r"sample(\d{3})", tokenizer.decode(item["input_ids"])).group(1) for item in batch]


def _loader(shards, cfg, encoder, processor, rank, world=2, workers=2):
    ds = StreamingDataset(Source(path=shards), cfg, encoder, processor.image_processor, rank=rank, world_size=world,
                          batch_size=2, seed=0)
    return StreamingLoader(ds, collate=list, num_workers=workers)


def test_every_sample_once_per_epoch_over_ranks_and_workers(shards, encoder, processor):
    cfg = DataConfig(on_error="skip", stream_shuffle_buffer=4, group_window=2)
    seen, per_rank = [], []
    for rank in range(2):
        loader = _loader(shards, cfg, encoder, processor, rank)
        ids = [i for batch in loader for i in _ids(processor.tokenizer, batch)]
        per_rank.append(ids)
        seen += ids
    expected = [f"{n:03d}" for n in range(SHARDS * PER_SHARD) if n != 13]  # 13: broken PNG, skipped
    assert sorted(seen) == expected  # exactly once, over both ranks
    assert all(len(ids) >= 8 for ids in per_rank)  # whole shards per rank
    # the next epoch reshuffles and again covers everything once
    again = [i for rank in range(2) for batch in _loader(shards, cfg, encoder, processor, rank)
             for i in _ids(processor.tokenizer, batch)]
    assert sorted(again) == expected


def test_bad_sample_counted(shards, encoder, processor):
    cfg = DataConfig(on_error="skip", stream_shuffle_buffer=0)
    loaders = [_loader(shards, cfg, encoder, processor, rank, workers=0) for rank in range(2)]
    for loader in loaders:
        list(loader)
    counts = sum((dict(loader.dataset.skipped.counts).get("bad_image_format", 0) for loader in loaders))
    assert counts == 1
    report = next(loader.dataset.skipped for loader in loaders if loader.dataset.skipped.total)
    assert report.ids["bad_image_format"] == ["s013"]


def test_resume_mid_epoch_continues_with_the_next_unseen_batch(shards, encoder, processor):
    cfg = DataConfig(on_error="skip", stream_shuffle_buffer=4, group_window=2)
    full = [_ids(processor.tokenizer, b) for b in _loader(shards, cfg, encoder, processor, 0)]
    first = _loader(shards, cfg, encoder, processor, 0)
    it = iter(first)
    head = [_ids(processor.tokenizer, next(it)) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))  # as saved with a checkpoint
    resumed = _loader(shards, cfg, encoder, processor, 0)
    resumed.load_state_dict(state)
    rest = [_ids(processor.tokenizer, b) for b in resumed]
    assert head + rest == full


def test_length_grouping_inside_the_window(shards, encoder, processor):
    cfg = DataConfig(on_error="skip", stream_shuffle_buffer=0, group_window=6)
    loader = _loader(shards, cfg, encoder, processor, 0, world=1, workers=0)
    spread = [max(len(i["input_ids"]) for i in b) - min(len(i["input_ids"]) for i in b) for b in loader if len(b) == 2]
    ungrouped = _loader(shards, DataConfig(on_error="skip", stream_shuffle_buffer=0, group_window=6,
                                           group_by_length=False), encoder, processor, 0, world=1, workers=0)
    spread_off = [max(len(i["input_ids"]) for i in b) - min(len(i["input_ids"]) for i in b) for b in ungrouped
                  if len(b) == 2]
    assert sum(spread) < sum(spread_off)


@pytest.mark.slow
def test_llava_train_streams_and_resumes(shards, tmp_path):
    """`llava train data.streaming=true` on tar shards: the stream's position is saved with each checkpoint
    and a resumed run continues from it (consumed batches keep counting, not restarting)."""
    import subprocess
    import sys

    from conftest import REPO

    def train(steps, job="job", *extra):
        proc = subprocess.run(
            [sys.executable, "-m", "llava_train", "train", f"output_dir={tmp_path}/{job}", f"data.train_path={shards}",
             "data.streaming=true", "data.on_error=skip", "data.eval_path=null", "data.num_workers=2",
             "data.stream_shuffle_buffer=4", f"trainer.max_steps={steps}", "trainer.save_steps=2",
             "trainer.per_device_train_batch_size=2", "model=tiny", "peft=lora",
             "trainer.disable_tqdm=true", "eval.enabled=false", *extra],
            cwd=REPO, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def consumed(step, job="job"):
        state = json.loads((tmp_path / job / f"checkpoint-{step}" / "stream_state_rank0.json").read_text())
        return sum(state["consumed"].values())

    train(4)
    assert consumed(2) == 2 and consumed(4) == 4
    # continued for longer (another max_steps: another run's checkpoint, so named explicitly)
    train(6, "longer", f"trainer.resume={tmp_path}/job/checkpoint-4", "trainer.resume_other_run=true")
    assert consumed(6, "longer") == 6
