"""Exact labels of demo samples: only assistant replies and their </s> are trained."""

import json

import pytest
from PIL import Image

from conftest import DEMO
from llava_train.config import DataConfig
from llava_train.constants import IGNORE_INDEX
from llava_train.data.dataset import ConversationDataset
from llava_train.data.formats import Turn, to_conversation
from llava_train.data.images import ImageGeometry, num_image_tokens


def _row(sample_id):
    rows = json.loads((DEMO / "train.json").read_text())
    return next(r for r in rows if r["id"] == sample_id)


def _trained(labels):
    return [t for t in labels if t != IGNORE_INDEX]


def _encode(encoder, sample_id):
    conv = to_conversation(_row(sample_id), fmt="auto", source="train.json", index=0)
    sizes = [Image.open(DEMO / p).size[::-1] for p in conv.images]
    return conv, sizes, encoder.encode(conv, sizes)


def test_single_turn_labels(encoder, processor):
    conv, sizes, enc = _encode(encoder, "train-00000")  # "<image>\nWhat is the color ...?" -> "yellow"
    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens(_trained(enc.labels)) == ["▁yellow", "</s>"]
    # everything before the reply is the generation prompt, with the image expanded
    n_img = num_image_tokens(*sizes[0], ImageGeometry.from_processor(processor))
    prompt = encoder.encode_prompt(conv, conv.turns[:-1], sizes)
    assert enc.input_ids[: len(prompt)] == prompt
    assert enc.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert len(enc.input_ids) == len(prompt) + 2
    assert prompt.count(32000) == n_img
    # ... which is the seed's prompt string tokenised by plain transformers, <image> expanded
    ids = tok("[INST] <image>\nWhat is the color of the object in the image? [/INST]").input_ids
    k = ids.index(32000)
    assert prompt == ids[:k] + [32000] * n_img + ids[k + 1:]


def test_multi_turn_labels(encoder, processor):
    conv, sizes, enc = _encode(encoder, "train-00011")  # red / "The circle is red."
    tok = processor.tokenizer
    trained = _trained(enc.labels)
    assert tok.convert_ids_to_tokens(trained) == ["▁red", "</s>", "▁The", "▁circle", "▁is", "▁red", ".", "</s>"]
    # the second reply's prompt is exactly the generation prompt for the first three turns
    prompt2 = encoder.encode_prompt(conv, conv.turns[:3], sizes)
    assert enc.input_ids[: len(prompt2)] == prompt2
    assert _trained(enc.labels[: len(prompt2)]) == trained[:2]


def test_text_only_labels(encoder, processor):
    conv, sizes, enc = _encode(encoder, "train-00017")
    assert sizes == [] and 32000 not in enc.input_ids
    assert processor.tokenizer.convert_ids_to_tokens(_trained(enc.labels)) == ["▁blue", "</s>"]


@pytest.mark.parametrize("reply,first", [("3 apples", ["▁", "3"]), (".hidden", ["▁."]), ("\nnew", ["▁", "<0x0A>"])])
def test_separator_space_belongs_to_reply(encoder, processor, reply, first):
    """A reply starting with a digit/punctuation/newline tokenises the space alone: it is trained."""
    from llava_train.data.formats import Conversation

    conv = Conversation(id="x", turns=[Turn("user", "Count?"), Turn("assistant", reply)])
    enc = encoder.encode(conv, [])
    toks = processor.tokenizer.convert_ids_to_tokens(_trained(enc.labels))
    assert toks[: len(first)] == first and toks[-1] == "</s>"
    prompt = encoder.encode_prompt(conv, conv.turns[:1], [])
    assert enc.input_ids[: len(prompt)] == prompt and len(_trained(enc.labels)) == len(enc.input_ids) - len(prompt)


def test_dataset_item_is_consistent(processor, encoder):
    ds = ConversationDataset(str(DEMO / "train.json"), DataConfig(train_path=str(DEMO / "train.json")), encoder,
                             processor.image_processor)
    item = ds[0]
    assert item["input_ids"].shape == item["labels"].shape
    assert len(item["pixel_values"]) == 1 and item["image_sizes"][0] == list(ds.items[0][1][0])
    assert ds.skipped.total == 0 and len(ds) == 2000
