"""Packing: the loss of a packed batch equals the mean token loss of the same samples unpacked, with
attention kept inside each sample (sdpa and eager, through transformers' packed-sequence detection)."""

import json

import pytest
import torch

from conftest import DEMO
from llava_train.config import DataConfig
from llava_train.constants import IGNORE_INDEX, IMAGE_SIZES, INPUT_IDS, LABELS, PIXEL_VALUES
from llava_train.data.collate import Collator
from llava_train.data.dataset import ConversationDataset
from llava_train.data.packing import POSITION_IDS, PackingCollator
from llava_train.train.loss import sparse_lm_loss


def mixed_rows():
    """Demo rows: single image, multi-turn, text-only, plus one two-image sample."""
    rows = json.loads((DEMO / "train.json").read_text())
    picked = [rows[i] for i in (0, 1, 2, 3, 11, 17, 21, 36)]
    two = {"id": "two-images", "image": [rows[4]["image"], rows[5]["image"]],
           "conversations": [{"from": "human", "value": "<image>\n<image>\nSame colour?"},
                             {"from": "gpt", "value": "no"}]}
    return picked + [two]


@pytest.fixture(scope="module")
def items(processor, encoder, tmp_path_factory):
    path = tmp_path_factory.mktemp("mix") / "mix.json"
    path.write_text(json.dumps(mixed_rows()))
    cfg = DataConfig(train_path=str(path), image_root=str(DEMO))
    ds = ConversationDataset(str(path), cfg, encoder, processor.image_processor)
    assert len(ds) == 9
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked(tiny_dir, items, attn):
    from transformers import LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(str(tiny_dir), attn_implementation=attn).eval()
    longest = max(len(it[INPUT_IDS]) for it in items)
    packed = PackingCollator(pad_token_id=0, max_length=2 * longest + 10)(items)
    assert packed[INPUT_IDS].shape[0] < len(items) / 2  # really several samples per row
    assert "attention_mask" not in packed
    with torch.no_grad():
        loss_packed, _ = sparse_lm_loss(model, packed)
        loss_plain, _ = sparse_lm_loss(model, Collator(pad_token_id=0)(items))
        # ...and each sample alone, averaged over all trained tokens
        sums = counts = 0
        for it in items:
            single = Collator(pad_token_id=0)([it])
            n = int((single[LABELS][:, 1:] != IGNORE_INDEX).sum())
            loss, _ = sparse_lm_loss(model, single)
            sums, counts = sums + loss * n, counts + n
    torch.testing.assert_close(loss_packed, loss_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_packed, sums / counts, rtol=1e-5, atol=1e-5)


def test_without_restarting_positions_attention_leaks(tiny_model, items):
    """The equality above is not vacuous: one causal sequence over the same row changes the loss."""
    longest = max(len(it[INPUT_IDS]) for it in items)
    packed = PackingCollator(pad_token_id=0, max_length=2 * longest + 10)(items)
    leaky = dict(packed)
    w = packed[INPUT_IDS].shape[1]
    leaky[POSITION_IDS] = torch.arange(w).expand_as(packed[POSITION_IDS])
    with torch.no_grad():
        good, _ = sparse_lm_loss(tiny_model, packed)
        bad, _ = sparse_lm_loss(tiny_model, leaky)
    assert abs(float(good) - float(bad)) > 1e-4


def test_packed_layout(items):
    col = PackingCollator(pad_token_id=0, max_length=1000, pad_to_multiple_of=8)
    batch = col(items)
    rows = col.rows(items)
    assert batch[INPUT_IDS].shape[1] % 8 == 0 and batch[INPUT_IDS].shape[1] <= 1000 + 7
    assert sorted(i for r in rows for i in r) == list(range(len(items)))
    n_images = 0
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(items[i][INPUT_IDS])
            assert batch[POSITION_IDS][r, at: at + n].tolist() == list(range(n))  # restart per sample
            assert batch[LABELS][r, at] == IGNORE_INDEX  # nothing trained across a boundary
            assert batch[INPUT_IDS][r, at: at + n].tolist() == items[i][INPUT_IDS].tolist()
            at += n
            n_images += len(items[i].get(PIXEL_VALUES, []))
        assert (batch[LABELS][r, at:] == IGNORE_INDEX).all()
    # images stay with their samples, in row order
    order = [i for r in rows for i in r]
    sizes = [s for i in order for s in items[i].get(IMAGE_SIZES, [])]
    assert batch[PIXEL_VALUES].shape[0] == n_images and batch[IMAGE_SIZES].tolist() == sizes


@pytest.mark.slow
def test_trainer_hook_feeds_packed_batches(tiny_dir, processor, encoder, tmp_path):
    """`LlavaTrainer.get_train_dataloader` serves the batch plan; packed steps train with a finite loss."""
    from transformers import LlavaNextForConditionalGeneration, TrainingArguments

    from llava_train.config import OptimConfig
    from llava_train.data.sampler import batching
    from llava_train.train.trainer import LlavaTrainer

    path = tmp_path / "mix.json"
    path.write_text(json.dumps(mixed_rows()))
    cfg = DataConfig(train_path=str(path), image_root=str(DEMO), packing=True, max_length=512)
    ds = ConversationDataset(str(path), cfg, encoder, processor.image_processor)
    collate, sampler = batching(cfg, ds, 0, batch_size=2, world_size=1, seed=0)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             report_to=[], save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
                             logging_steps=1, learning_rate=1e-3)
    model = LlavaNextForConditionalGeneration.from_pretrained(str(tiny_dir))
    trainer = LlavaTrainer(model=model, args=args, train_dataset=ds, data_collator=collate,
                           optim_cfg=OptimConfig(lr=1e-3), train_batch_sampler=sampler)
    batches = list(trainer.get_train_dataloader())
    assert len(batches) == len(sampler) and all(POSITION_IDS in b for b in batches)
    assert sum(b[INPUT_IDS].shape[0] for b in batches) < len(ds)  # rows hold several samples
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
