"""Conversations to exact training examples.

`Encoder.encode` turns a validated `Conversation` into input ids and labels:
- the prompt family renders pieces; the whole text is tokenised once, and for every reply the token
  ids of the text before it (the generation prompt) and up to its end-of-turn must be prefixes of the
  whole: that proves the training form equals the inference form, and marks exactly the reply tokens;
- labels are IGNORE_INDEX everywhere except replies and their end-of-turn token;
- each `<image>` is expanded to the image's feature count (from its header size);
- truncation to `max_length` drops whole trailing turns, never part of an image or a reply.

`ConversationDataset` indexes a file once (headers only, no pixels), counts and reports skipped
samples, and decodes/preprocesses pixels lazily in `__getitem__` (DataLoader workers).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from llava_train.config import DataConfig
from llava_train.constants import IGNORE_INDEX, IMAGE_SIZES, IMAGE_TOKEN, INPUT_IDS, LABELS, PIXEL_VALUES
from llava_train.data.formats import Conversation, DataError, load_rows, to_conversation
from llava_train.data.images import ImageGeometry, image_size, load_rgb, num_image_tokens
from llava_train.data.templates import PromptFamily

log = logging.getLogger(__name__)


def validate_conversation(conv: Conversation) -> None:
    """Structure checks that need no tokenizer: roles, alternation, replies, placeholders."""
    turns = conv.turns
    body = turns[1:] if turns and turns[0].role == "system" else turns
    if any(t.role == "system" for t in body):
        raise conv.error("a system message may only come first", kind="bad_structure")
    if not body:
        raise conv.error("the conversation has no turns", kind="bad_structure")
    if body[0].role != "user":
        raise conv.error("the conversation starts with the assistant; it must start with a user turn",
                         kind="bad_structure")
    for j, turn in enumerate(body):
        expected = "user" if j % 2 == 0 else "assistant"
        if turn.role != expected:
            raise conv.error(f"turn {j} is {turn.role!r} but {expected!r} was expected: turns must alternate "
                             "user/assistant", kind="bad_structure")
        if turn.role == "assistant" and not turn.text.strip():
            raise conv.error(f"turn {j}: empty assistant reply; remove the turn or fill it", kind="empty_reply")
        if turn.role == "assistant" and IMAGE_TOKEN in turn.text:
            raise conv.error(f"turn {j}: {IMAGE_TOKEN} in an assistant reply", kind="placeholder_mismatch")
    if body[-1].role != "assistant":
        raise conv.error("the last turn is a user turn without an assistant reply", kind="empty_reply")
    placeholders = sum(t.text.count(IMAGE_TOKEN) for t in turns)
    if placeholders != len(conv.images):
        raise conv.error(f"{placeholders} {IMAGE_TOKEN} placeholder(s) but {len(conv.images)} image(s); "
                         "each image needs exactly one placeholder", field="image", kind="placeholder_mismatch")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int  # images kept after truncation (a prefix of the sample's images)
    image_tokens: list[int] = field(default_factory=list)  # per kept image


class Encoder:
    """Tokenises conversations for one tokenizer, prompt family and image geometry."""

    def __init__(self, tokenizer, family: PromptFamily, geometry: Optional[ImageGeometry], *,
                 max_length: int, overflow: str = "skip", last_turn_only: bool = False):
        self.tok = tokenizer
        self.family = family
        self.geometry = geometry
        self.max_length = max_length
        self.overflow = overflow
        self.last_turn_only = last_turn_only
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=True)["input_ids"]

    def encode(self, conv: Conversation, sizes: list[tuple[int, int]]) -> Encoded:
        pieces = self.family.pieces(conv.turns)
        text = "".join(p.text for p in pieces)
        ids = self._ids(text)
        labels = [IGNORE_INDEX] * len(ids)
        reply_ends: list[int] = []  # token index just after each reply's end-of-turn
        pos = 0
        trained = [i for i, p in enumerate(pieces) if p.trained]
        if self.last_turn_only:
            trained = trained[-1:]
        for i, piece in enumerate(pieces):
            start, end = pos, pos + len(piece.text)
            pos = end
            if not piece.trained:
                continue
            before, upto = self._ids(text[:start]), self._ids(text[:end])
            if ids[: len(before)] != before or ids[: len(upto)] != upto:
                raise conv.error(
                    f"the {self.family.name!r} template does not tokenise stably around reply {len(reply_ends)} "
                    "(the training prompt would differ from the inference prompt); check the text for "
                    "stray special tokens", kind="template_mismatch")
            if len(upto) <= len(before):
                raise conv.error(f"reply {len(reply_ends)} produced no tokens", kind="empty_reply")
            if i in trained:
                labels[len(before): len(upto)] = ids[len(before): len(upto)]
            reply_ends.append(len(upto))

        out_ids, out_labels, new_pos, images_before, counts = self._expand(conv, ids, labels, sizes)

        if len(out_ids) <= self.max_length:
            return Encoded(out_ids, out_labels, len(sizes), counts)
        # Drop whole trailing turns: cut after the last reply that still fits.
        fitting = [e for e in reply_ends if new_pos[e] <= self.max_length]
        if not fitting or all(lab == IGNORE_INDEX for lab in out_labels[: new_pos[fitting[-1]]]):
            raise conv.error(f"the first turn needs {new_pos[reply_ends[0]]} tokens (images included), over "
                             f"data.max_length={self.max_length}; raise max_length or shorten the sample",
                             kind="too_long")
        cut = fitting[-1]
        kept = images_before[cut]
        return Encoded(out_ids[: new_pos[cut]], out_labels[: new_pos[cut]], kept, counts[:kept])


    def _expand(self, conv: Conversation, ids: list[int], labels: list[int], sizes: list[tuple[int, int]]):
        """Expand each `<image>` id to its feature count; also map old positions to new ones."""
        n_ph = ids.count(self.image_token_id)
        if n_ph != len(sizes):
            raise conv.error(f"{n_ph} {IMAGE_TOKEN} token(s) after tokenisation but {len(sizes)} image(s)",
                             kind="placeholder_mismatch")
        counts = [num_image_tokens(h, w, self.geometry) for h, w in sizes]
        out_ids: list[int] = []
        out_labels: list[int] = []
        new_pos: list[int] = []
        images_before: list[int] = []  # images entirely before each old position
        img = 0
        for tid, lab in zip(ids, labels):
            new_pos.append(len(out_ids))
            images_before.append(img)
            if tid == self.image_token_id:
                out_ids.extend([tid] * counts[img])
                out_labels.extend([IGNORE_INDEX] * counts[img])
                img += 1
            else:
                out_ids.append(tid)
                out_labels.append(lab)
        new_pos.append(len(out_ids))
        images_before.append(img)
        return out_ids, out_labels, new_pos, images_before, counts

    def encode_prompt(self, conv: Conversation, turns, sizes: list[tuple[int, int]]) -> list[int]:
        """Generation-prompt ids for `turns` (ending with a user turn), images expanded."""
        ids = self._ids(self.family.generation_prompt(turns))
        return self._expand(conv, ids, [IGNORE_INDEX] * len(ids), sizes)[0]


@dataclass
class SkipReport:
    """Samples left out of a dataset, by kind, with the first few ids of each (never silent)."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, err: DataError) -> None:
        self.counts[err.kind] += 1
        self.examples.setdefault(err.kind, [])
        if len(self.examples[err.kind]) < 3:
            self.examples[err.kind].append(str(err))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no samples skipped"
        lines = [f"{self.total} sample(s) skipped:"]
        for kind, n in self.counts.most_common():
            lines.append(f"  {kind}: {n}  e.g. {self.examples[kind][0]}")
        return "\n".join(lines)


class ConversationDataset(torch.utils.data.Dataset):
    """A data file as training examples; pixels are decoded lazily per item."""

    def __init__(self, path: str, cfg: DataConfig, encoder: Encoder, image_processor, *, fmt: str = "auto"):
        self.path = Path(path)
        self.image_root = Path(cfg.image_root) if cfg.image_root else self.path.parent
        self.encoder = encoder
        self.image_processor = image_processor
        self.skipped = SkipReport()
        self.items: list[tuple[Conversation, list[tuple[int, int]]]] = []
        self.lengths: list[int] = []
        for index, row in load_rows(self.path):
            try:
                conv = to_conversation(row, fmt=fmt, source=str(self.path), index=index)
                validate_conversation(conv)
                sizes = [image_size(ref, self.image_root, conv, k) for k, ref in enumerate(conv.images)]
                enc = encoder.encode(conv, sizes)
            except DataError as err:
                if err.kind == "too_long" and cfg.overflow == "skip":
                    self.skipped.add(err)
                    continue
                if cfg.on_error == "skip" and err.kind != "too_long":
                    self.skipped.add(err)
                    continue
                raise
            self.items.append((conv, sizes))
            self.lengths.append(len(enc.input_ids))
        if self.skipped.total:
            log.warning("%s: %s", self.path, self.skipped.summary())
        if not self.items:
            raise DataError("no usable samples", source=str(self.path))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        conv, sizes = self.items[i]
        enc = self.encoder.encode(conv, sizes)
        item: dict[str, Any] = {
            INPUT_IDS: torch.tensor(enc.input_ids, dtype=torch.long),
            LABELS: torch.tensor(enc.labels, dtype=torch.long),
        }
        if enc.num_images:
            images = [load_rgb(ref, self.image_root, conv, k) for k, ref in enumerate(conv.images[: enc.num_images])]
            out = self.image_processor(images=images, do_pad=False)
            item[PIXEL_VALUES] = [torch.as_tensor(p) for p in out["pixel_values"]]
            item[IMAGE_SIZES] = [list(s) for s in sizes[: enc.num_images]]
        return item

    def conversation(self, i: int) -> Conversation:
        return self.items[i][0]

    def question_type(self, i: int) -> str:
        return self.items[i][0].question_type
