"""Conversations to exact input ids and labels.

`Encoder.encode` turns a validated `Conversation` into input ids and labels:
- the prompt family renders pieces and tokenises them (`data.templates.TemplateTokenizer`: replies
  apart from the header, message text spelling special tokens as plain text by default); for every
  reply the tokens before it must equal the generation prompt tokenised as a whole string (what
  `processor.apply_chat_template` gives at inference): the training form equals the inference form.
  That whole-string tokenisation is computed once for the whole text; each reply's prefix re-tokenises
  only from the last added token before it (`Encoder._inference_prefix`), so encoding is linear in the
  number of turns;
- labels are IGNORE_INDEX everywhere except replies and their end-of-turn token;
- each `<image>` is expanded to the image's feature count (from its header size);
- truncation to `max_length` drops whole trailing turns, never part of an image or a reply.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Optional

from llava_train.config import DataConfig
from llava_train.constants import IGNORE_INDEX, IMAGE_TOKEN
from llava_train.data.formats import Conversation
from llava_train.data.images import ImageGeometry, num_image_tokens
from llava_train.data.templates import PromptFamily, SpecialTokensInText, TemplateTokenizer

OVERFLOW_POLICIES = ("drop_turns", "skip", "error")
# One encoding at a time per process: a batch's samples are fetched by several threads (dataset.py), and a
# Rust tokenizer used from two threads while one changes its settings fails with "Already borrowed"
# (huggingface/tokenizers#537). Encoding is pure Python around the tokenizer, serial under the GIL anyway.
_ENCODING = threading.Lock()


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
    special_text: list[str] = field(default_factory=list)  # special-token strings the message text spells


class Encoder:
    """Tokenises conversations for one tokenizer, prompt family and image geometry."""

    def __init__(self, tokenizer, family: PromptFamily, geometry: Optional[ImageGeometry], *,
                 max_length: int, overflow: str = "drop_turns", last_turn_only: bool = False,
                 special_tokens_in_text: str = SpecialTokensInText.text, image_placement: str = "front"):
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"data.overflow={overflow!r}: use one of {OVERFLOW_POLICIES}")
        self.tok = tokenizer
        self.family = family
        self.geometry = geometry
        self.max_length = max_length
        self.overflow = overflow
        self.last_turn_only = last_turn_only
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        # The family's special tokens must be single tokens of this tokenizer (else the template
        # silently splits them into pieces, e.g. `<|im_start|>` into 7): a wrong model.family fails here.
        for token in family.control_tokens:
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"the tokenizer has no {token!r} token, which the {family.name!r} prompt family "
                                 "uses; is model.family right for this checkpoint?")
        # The family's BOS as a token (the prompt text never contains it).
        self.bos_ids: list[int] = [tokenizer.convert_tokens_to_ids(family.bos)] if family.bos else []
        # Added tokens that split the text exactly where they stand (no whitespace stripping around them):
        # the anchors from which `_inference_prefix` re-tokenises.
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self._anchor_ids = frozenset(i for i, t in added.items()
                                     if not (getattr(t, "lstrip", False) or getattr(t, "rstrip", False)
                                             or getattr(t, "single_word", False)))
        self.template = TemplateTokenizer(tokenizer, family, special_tokens_in_text)
        self.image_placement = image_placement  # applied where rows become conversations (`prepare`)

    @classmethod
    def from_config(cls, tokenizer, family: PromptFamily, geometry: Optional[ImageGeometry],
                    cfg: DataConfig) -> "Encoder":
        return cls(tokenizer, family, geometry, max_length=cfg.max_length, overflow=cfg.overflow,
                   last_turn_only=cfg.train_last_turn_only, special_tokens_in_text=cfg.special_tokens_in_text,
                   image_placement=cfg.image_placement)

    def _ids(self, text: str) -> list[int]:
        return self.bos_ids + self.tok(text, add_special_tokens=False)["input_ids"]

    def _tokenise(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of `text` (BOS first) and the anchors in it: (character, token index) of each added
        token that splits the text (see `encode`); (0, 0) is the start of the text."""
        anchors = [(0, 0)]
        if not getattr(self.tok, "is_fast", False):  # no offsets: every prefix is checked from the start
            return self._ids(text), anchors
        out = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        body, offsets = out["input_ids"], out["offset_mapping"]
        anchors += [(offsets[k][0], len(self.bos_ids) + k) for k, t in enumerate(body) if t in self._anchor_ids]
        return self.bos_ids + body, anchors

    def _inference_prefix(self, text: str, whole: list[int], anchors: list[tuple[int, int]], chars: list[int],
                          p: int) -> list[int]:
        """`text[:p]` tokenised as one string (as inference does), from `whole`, the whole text's ids.

        An added token (special tokens, `<image>`) is cut out of the text before the tokenizer's normaliser,
        pre-tokenizer and model see the rest, each piece between added tokens on its own: the ids of
        `text[:p]` are the ids of the whole text up to the last added token starting at or before `p`,
        then the ids of `text[a:p]`. Only that window is tokenised again, so the check costs the length of
        one turn, not of the whole prefix (linear encoding in the number of turns)."""
        j = bisect.bisect_right(chars, p) - 1
        a, k = anchors[j]
        if j == 0:
            return self._ids(text[:p])
        return whole[:k] + self.tok(text[a:p], add_special_tokens=False)["input_ids"]

    def encode(self, conv: Conversation, sizes: list[tuple[int, int]]) -> Encoded:
        with _ENCODING:
            return self._encode(conv, sizes)

    def _encode(self, conv: Conversation, sizes: list[tuple[int, int]]) -> Encoded:
        pieces = self.family.pieces(conv.turns)
        body, reply_spans = self.template.encode(pieces)
        ids = self.bos_ids + body
        n = len(self.bos_ids)
        spans = [(s + n, e + n) for s, e in reply_spans]  # token span of each reply: separator, reply, end-of-turn
        labels = [IGNORE_INDEX] * len(ids)
        special = self.template.special_text(pieces)
        # Inference tokenises the generation prompt as one string (parsing special tokens): the tokens
        # before each reply must be exactly that. Not comparable when the data spells special tokens
        # (kept as text on purpose) or after a reply with surrounding whitespace (an HF chat template
        # re-renders history as text, which may merge it with the scaffolding; training keeps the
        # original per-message tokenisation, see data.templates).
        checked = not (special and self.template.split)
        text = "".join(p.text for p in pieces) if checked else ""
        whole, anchors = self._tokenise(text) if checked else ([], [(0, 0)])
        chars = [a for a, _ in anchors]
        starts = [0]
        for piece in pieces:
            starts.append(starts[-1] + len(piece.text))
        replies = [k for k, piece in enumerate(pieces) if piece.trained]
        for r, (k, (s, e)) in enumerate(zip(replies, spans)):
            piece = pieces[k]
            if checked and self._inference_prefix(text, whole, anchors, chars, starts[k]) != ids[:s]:
                raise conv.error(
                    f"the {self.family.name!r} prompt before reply {r} does not tokenise as the training tokens "
                    "(the inference prompt would differ from training); check the text around that turn",
                    kind="template_mismatch")
            if e <= s:
                raise conv.error(f"reply {r} produced no tokens", kind="empty_reply")
            labels[s:e] = ids[s:e]
            if piece.content != piece.content.strip():
                checked = False

        out_ids, out_labels, new_pos, images_before, counts = self._expand(conv, ids, labels, sizes)
        kept_replies, kept_images, length = len(spans), len(sizes), len(out_ids)
        if length > self.max_length:
            if self.overflow != "drop_turns":
                raise conv.error(f"the sample needs {length} tokens (images included), over "
                                 f"data.max_length={self.max_length} (data.overflow={self.overflow}); raise "
                                 "max_length, shorten the sample, or set data.overflow=drop_turns",
                                 kind="too_long")
            # Drop whole trailing turns: cut after the last reply that still fits (never inside an
            # image, never before a reply's end-of-turn).
            kept_replies = sum(1 for _, e in spans if new_pos[e] <= self.max_length)
            if not kept_replies:
                raise conv.error(f"the first turn needs {new_pos[spans[0][1]]} tokens (images included), over "
                                 f"data.max_length={self.max_length}; raise max_length or shorten the sample",
                                 kind="too_long")
            cut = spans[kept_replies - 1][1]
            kept_images, length = images_before[cut], new_pos[cut]
        out_ids, out_labels = out_ids[:length], out_labels[:length]
        if self.last_turn_only:  # train only the last (kept) reply
            last = new_pos[spans[kept_replies - 1][0]]
            out_labels = [IGNORE_INDEX] * last + out_labels[last:]
        return Encoded(out_ids, out_labels, kept_images, counts[:kept_images], special)

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
        self.family.generation_prompt(turns)  # checks the turns end with a user turn
        ids = self.bos_ids + self.template.encode(self.family.pieces(turns, add_generation_prompt=True))[0]
        return self._expand(conv, ids, [IGNORE_INDEX] * len(ids), sizes)[0]
