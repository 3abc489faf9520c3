"""Collator: shapes for a mix of multi-image, single-image and text-only samples; padding sides; patches
padded only to the batch maximum; DataLoader workers with a batch plan."""

import json

import pytest
import torch

from conftest import DEMO
from llava_train.config import DataConfig
from llava_train.constants import ATTENTION_MASK, IGNORE_INDEX, IMAGE_SIZES, INPUT_IDS, LABELS, PIXEL_VALUES
from llava_train.data.collate import Collator
from llava_train.data.dataset import ConversationDataset
from llava_train.data.sampler import PlanSampler, PlanSpec, has_image_flags


@pytest.fixture(scope="module")
def dataset(processor, encoder, tmp_path_factory):
    rows = json.loads((DEMO / "train.json").read_text())
    picked = [rows[i] for i in (0, 17, 11, 21, 1, 2, 36, 3)]  # images, text-only (17, 21, 36), multi-turn
    two = {"id": "two", "image": [rows[4]["image"], rows[5]["image"]],
           "conversations": [{"from": "human", "value": "<image>\n<image>\nSame colour?"},
                             {"from": "gpt", "value": "no"}]}
    path = tmp_path_factory.mktemp("mix") / "mix.json"
    path.write_text(json.dumps(picked + [two]))
    return ConversationDataset(str(path), DataConfig(train_path=str(path), image_root=str(DEMO)), encoder,
                               processor.image_processor)


def test_multi_image_and_text_only_mix(dataset):
    items = [dataset[i] for i in range(len(dataset))]
    batch = Collator(pad_token_id=0, pad_to_multiple_of=8)(items)
    n, longest = len(items), max(len(it[INPUT_IDS]) for it in items)
    width = -(-longest // 8) * 8
    assert batch[INPUT_IDS].shape == batch[LABELS].shape == batch[ATTENTION_MASK].shape == (n, width)
    images = [p for it in items for p in it.get(PIXEL_VALUES, [])]
    assert len(images) == 7  # 5 single-image samples + one with two; text-only samples add none
    most = max(p.shape[0] for p in images)
    assert batch[PIXEL_VALUES].shape == (7, most, *images[0].shape[1:])  # batch max, not a fixed 5
    assert batch[IMAGE_SIZES].shape == (7, 2)
    for row, it in enumerate(items):  # right padding: real tokens first, mask and labels follow
        k = len(it[INPUT_IDS])
        assert batch[ATTENTION_MASK][row].tolist() == [1] * k + [0] * (width - k)
        assert (batch[LABELS][row, k:] == IGNORE_INDEX).all()
    # patches past an image's own count are zeros
    for k, p in enumerate(images):
        assert torch.equal(batch[PIXEL_VALUES][k, : p.shape[0]], p)
        assert not batch[PIXEL_VALUES][k, p.shape[0]:].any()


def test_text_only_batch_has_no_pixels(dataset):
    text = [i for i in range(len(dataset)) if not dataset.items[i][0].images]
    batch = Collator(pad_token_id=0)([dataset[i] for i in text])
    assert PIXEL_VALUES not in batch and IMAGE_SIZES not in batch


def test_left_padding_for_generation(dataset):
    items = [dataset[i] for i in (0, 1)]
    batch = Collator(pad_token_id=0, padding_side="left")(items)
    w = batch[INPUT_IDS].shape[1]
    for row, it in enumerate(items):
        k = len(it[INPUT_IDS])
        assert batch[INPUT_IDS][row, w - k:].tolist() == it[INPUT_IDS].tolist()
        assert batch[ATTENTION_MASK][row].tolist() == [0] * (w - k) + [1] * k


def test_workers_with_a_batch_plan(dataset):
    """Pixels are decoded in two worker processes; batches follow the plan, modality never mixed."""
    flags = has_image_flags(dataset)
    sampler = PlanSampler(dataset.lengths, flags, PlanSpec(batch_size=3, megabatch=2), seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=Collator(pad_token_id=0),
                                         num_workers=2, prefetch_factor=2)
    batches = list(loader)
    assert len(batches) == len(sampler.batches())
    for plan, batch in zip(sampler.batches(), batches):
        assert batch[INPUT_IDS].shape[0] == len(plan)
        assert (PIXEL_VALUES in batch) == flags[plan[0]]
        assert len({flags[i] for i in plan}) == 1
