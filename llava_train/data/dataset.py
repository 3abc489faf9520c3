"""Conversations to exact training examples.

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

`ConversationDataset` indexes a file once (headers only, no pixels), counts and reports skipped
samples, and decodes/preprocesses pixels lazily in `__getitem__` (DataLoader workers).
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from llava_train.config import DataConfig
from llava_train.constants import IGNORE_INDEX, IMAGE_SIZES, IMAGE_TOKEN, INPUT_IDS, LABELS, PIXEL_VALUES
from llava_train.data.formats import Conversation, DataError, place_images, to_conversation
from llava_train.data.images import ImageGeometry, image_size, load_rgb, num_image_tokens, resolve_ref
from llava_train.data.sources import Source, apply_weight, check_path, default_image_root, iter_rows
from llava_train.data.templates import PromptFamily, SpecialTokensInText, TemplateTokenizer

log = logging.getLogger(__name__)

OVERFLOW_POLICIES = ("drop_turns", "skip", "error")
FORMATS = ("auto", "llava", "messages")


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


@dataclass
class SkipReport:
    """Samples left out of a dataset, by kind, with the first few ids and messages of each (never silent)."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    ids: dict[str, list[str]] = field(default_factory=dict)
    keep: int = 3

    def add(self, err: DataError) -> None:
        where = err.sample_id if err.sample_id is not None else (f"#{err.index}" if err.index is not None else "?")
        self.record(err.kind, str(where), str(err))

    def record(self, kind: str, sample_id: str, message: str) -> None:
        self.counts[kind] += 1
        self.examples.setdefault(kind, [])
        self.ids.setdefault(kind, [])
        if len(self.examples[kind]) < self.keep:
            self.examples[kind].append(message)
            self.ids[kind].append(sample_id)

    def merge(self, other: "SkipReport") -> None:
        for kind, n in other.counts.items():
            self.counts[kind] += n
            self.examples.setdefault(kind, [])
            self.ids.setdefault(kind, [])
            room = self.keep - len(self.examples[kind])
            self.examples[kind] += other.examples.get(kind, [])[:room]
            self.ids[kind] += other.ids.get(kind, [])[:room]

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


# Every kind a `DataError` can have (the shared fetch-time counters index into this); others count as "invalid".
SKIP_KINDS = ("invalid", "malformed_json", "bad_encoding", "too_deep", "bad_structure", "unknown_role",
              "non_string_text", "empty_reply", "placeholder_mismatch", "template_mismatch", "too_long",
              "bad_image_ref", "missing_image", "not_a_file", "path_escape", "bad_image_format", "corrupt_image",
              "image_too_large")
MAX_REPLACEMENTS = 32  # consecutive failing samples before a fetch gives up (something systematic is wrong)


class FetchSkips:
    """Samples skipped when fetched (pixels decoded in DataLoader workers), counted in shared memory so
    the main process sees what every worker skipped: counts by kind and the first `keep` messages (each
    names the file, the sample and the field). Each of the `n` samples counts once, however often it is
    fetched (as itself or as a replacement; over epochs). Created before workers start (inherited)."""

    MESSAGE_BYTES = 400

    def __init__(self, n: int, keep: int = 5):
        import multiprocessing

        self.seen = multiprocessing.Array("B", (n + 7) // 8, lock=False)  # one bit per sample
        self.keep = keep
        self.counts = multiprocessing.Array("q", len(SKIP_KINDS))
        self.first_kind = multiprocessing.Array("q", [-1] * keep, lock=False)
        self.first_id = multiprocessing.Array("c", self.MESSAGE_BYTES * keep, lock=False)
        self.first_message = multiprocessing.Array("c", self.MESSAGE_BYTES * keep, lock=False)

    def add(self, i: int, err: DataError) -> int:
        """Count sample `i` failing with `err` (once); returns how many samples were skipped at fetch so far."""
        code = SKIP_KINDS.index(err.kind) if err.kind in SKIP_KINDS else 0
        where = err.sample_id if err.sample_id is not None else (f"#{err.index}" if err.index is not None else "?")
        with self.counts.get_lock():
            total = sum(self.counts[:])
            if i >= 0:  # i < 0: a sample without an index (streams: each is read once per epoch)
                if self.seen[i // 8] & (1 << (i % 8)):
                    return total
                self.seen[i // 8] |= 1 << (i % 8)
            self.counts[code] += 1
            if total < self.keep:
                b = self.MESSAGE_BYTES
                self.first_kind[total] = code
                self.first_id[total * b: (total + 1) * b] = str(where).encode()[:b].ljust(b, b"\0")
                self.first_message[total * b: (total + 1) * b] = str(err).encode()[:b].ljust(b, b"\0")
        return total + 1

    def report(self) -> SkipReport:
        out = SkipReport()
        b = self.MESSAGE_BYTES
        with self.counts.get_lock():
            counts = list(self.counts[:])
            for k in range(self.keep):
                if self.first_kind[k] >= 0:
                    out.record(SKIP_KINDS[self.first_kind[k]],
                               self.first_id[k * b: (k + 1) * b].rstrip(b"\0").decode(errors="replace"),
                               self.first_message[k * b: (k + 1) * b].rstrip(b"\0").decode(errors="replace"))
        for code, n in enumerate(counts):  # record() above counted the kept ones once
            if n:
                out.counts[SKIP_KINDS[code]] = n
        return out


def prepare(row: Any, *, index: int, source: str, fmt: str, image_root: Path,
            encoder: Encoder) -> tuple[Conversation, list[tuple[int, int]], Encoded]:
    """One raw row to a checked conversation (image references resolved), its image sizes (headers
    only) and its encoding. Raises `DataError` naming the sample for anything wrong with it."""
    if isinstance(row, DataError):
        raise row
    conv = place_images(to_conversation(row, fmt=fmt, source=source, index=index), encoder.image_placement)
    validate_conversation(conv)
    conv.images = [resolve_ref(ref, image_root, conv, k) for k, ref in enumerate(conv.images)]
    sizes = [image_size(ref, image_root, conv, k) for k, ref in enumerate(conv.images)]
    return conv, sizes, encoder.encode(conv, sizes)


def to_item(conv: Conversation, sizes: list[tuple[int, int]], enc: Encoded, image_processor,
            image_root: Path) -> dict[str, Any]:
    """A training item: ids and labels as tensors and, for the kept images, decoded pixels (every pixel:
    cut or corrupt image data raises a `DataError` here) through the image processor."""
    item: dict[str, Any] = {
        INPUT_IDS: torch.tensor(enc.input_ids, dtype=torch.long),
        LABELS: torch.tensor(enc.labels, dtype=torch.long),
    }
    if enc.num_images:
        images = [load_rgb(ref, image_root, conv, k) for k, ref in enumerate(conv.images[: enc.num_images])]
        out = image_processor(images=images, do_pad=False)
        item[PIXEL_VALUES] = [torch.as_tensor(p) for p in out["pixel_values"]]
        item[IMAGE_SIZES] = [list(s) for s in sizes[: enc.num_images]]
    return item


def should_skip(err: DataError, cfg: DataConfig) -> bool:
    """Too-long samples follow data.overflow; every other bad sample follows data.on_error."""
    if err.kind == "too_long":
        return cfg.overflow != "error"
    return cfg.on_error == "skip"


def as_sources(path: Union[str, list, None], cfg: DataConfig, fmt: Optional[str] = None) -> list[Source]:
    """`path` (a file/folder/hub id, or a list of `data.sources` entries) as `Source`s."""
    fmt = fmt or cfg.format
    if isinstance(path, (str, Path)) and str(path):
        return [Source(path=str(path), format=fmt, image_root=cfg.image_root)]
    entries = path or cfg.sources
    if not entries:
        raise ValueError("no data: set data.train_path or data.sources")
    return [Source(path=e.path, weight=e.weight, format=e.format or fmt, image_root=e.image_root or cfg.image_root,
                   split=e.split, name=e.name) for e in entries]


def iter_encoded(source: Source, cfg: DataConfig, encoder: Encoder, skipped: SkipReport):
    """(conversation, image sizes, `Encoded`) for each usable row of `source`, in order; a bad row is
    added to `skipped` or raised, as `data.on_error` / `data.overflow` say."""
    root = default_image_root(source, cfg.image_root)
    for index, row in iter_rows(source):
        try:
            yield prepare(row, index=index, source=source.path, fmt=source.format, image_root=root, encoder=encoder)
        except DataError as err:
            if not should_skip(err, cfg):
                raise
            skipped.add(err)


class ExampleDataset(torch.utils.data.Dataset):
    """What the eager and the lazy dataset share: fetching with the bad-data policy.

    `_fetch(i)` builds item i (decoding pixels). A sample that fails there is raised (data.on_error=error,
    or data.overflow=error for too-long ones: the `DataError` names file, sample and field) or skipped:
    counted in `fetch_skips` (shared by all DataLoader workers), logged, and replaced by the next sample
    that works, so every batch still forms with its planned size. `skipped` is the whole report: samples
    left out at start plus those skipped at fetch so far.
    """

    cfg: DataConfig
    start_skips: SkipReport
    fetch_skips: FetchSkips

    def _fetch(self, i: int) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def skipped(self) -> SkipReport:
        out = SkipReport()
        out.merge(self.start_skips)
        out.merge(self.fetch_skips.report())
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        for attempt in range(min(MAX_REPLACEMENTS, n)):
            j = (i + attempt) % n
            try:
                return self._fetch(j)
            except DataError as err:
                if not should_skip(err, self.cfg):
                    raise
                before = sum(self.fetch_skips.counts[:])
                count = self.fetch_skips.add(j, err)
                if count > before and (count <= 20 or count % 1000 == 0):
                    log.warning("skipped at fetch (%d so far; replaced by the next sample): %s", count, err)
        raise DataError(f"{min(MAX_REPLACEMENTS, n)} consecutive samples from #{i} failed when fetched "
                        f"({self.fetch_skips.report().summary()}); something systematic is wrong (data.image_root?)",
                        source=str(getattr(self, "path", "")), index=i)


class ConversationDataset(ExampleDataset):
    """A data source (or a weighted mix of sources) as training examples.

    Indexing reads image headers only; pixels are decoded lazily per item (DataLoader workers).
    `items[i]` is `(conversation, image sizes)`, `lengths[i]` its token count (images expanded),
    `skipped` the `SkipReport` of samples left out.
    """

    def __init__(self, path, cfg: DataConfig, encoder: Encoder, image_processor, *, fmt: Optional[str] = None):
        self.sources = as_sources(path, cfg, fmt)
        self.path = Path(self.sources[0].path)
        self.image_root = default_image_root(self.sources[0], cfg.image_root)
        self.encoder = encoder
        self.image_processor = image_processor
        self.cfg = cfg
        self.start_skips = SkipReport()
        self.items: list[tuple[Conversation, list[tuple[int, int]]]] = []
        self.lengths: list[int] = []
        self.source_index: list[int] = []  # which source each item came from
        self.root_of = [default_image_root(src, cfg.image_root) for src in self.sources]
        for s, source in enumerate(self.sources):
            items, lengths = [], []
            for conv, sizes, enc in iter_encoded(source, cfg, encoder, self.start_skips):
                items.append((conv, sizes))
                lengths.append(len(enc.input_ids))
            for k in apply_weight(len(items), source.weight, cfg.mix_seed + s):
                self.items.append(items[k])
                self.lengths.append(lengths[k])
                self.source_index.append(s)
        self.fetch_skips = FetchSkips(len(self.items))
        if self.start_skips.total:
            log.warning("%s: %s", self.path, self.start_skips.summary())
        if not self.items:
            raise DataError("no usable samples" + (f" ({self.start_skips.summary()})" if self.start_skips.total
                                                   else ""),
                            source=str(self.path))

    def __len__(self) -> int:
        return len(self.items)

    def _fetch(self, i: int) -> dict[str, Any]:
        conv, sizes = self.items[i]
        return to_item(conv, sizes, self.encoder.encode(conv, sizes), self.image_processor,
                       self.root_of[self.source_index[i]])

    def conversation(self, i: int) -> Conversation:
        return self.items[i][0]

    def question_type(self, i: int) -> str:
        return self.items[i][0].question_type


def check_stream(cfg: DataConfig) -> list[str]:
    """Problems with a streaming source (data.streaming): one source; local tar shards must exist."""
    import glob

    if cfg.sources or not cfg.train_path:
        return ["data.streaming reads one source: set data.train_path (tar shards, a parquet/arrow file or a hub "
                "id), not data.sources"]
    path = cfg.train_path
    if ".tar" in Path(path).name and "://" not in path and not glob.glob(path):
        return [f"data.train_path={path!r}: no tar shards match it"]
    if ".tar" not in Path(path).name and "://" not in path:
        return check_path(path, "data.train_path")
    return []


def check_data(cfg: DataConfig) -> list[str]:
    """Problems with a `DataConfig`, for up-front validation (nothing is read but file existence)."""
    problems: list[str] = []
    if not cfg.train_path and not cfg.sources:
        problems.append("set data.train_path or data.sources")
    if cfg.streaming:
        problems += check_stream(cfg)
    elif cfg.train_path:
        problems += check_path(cfg.train_path, "data.train_path")
    for k, src in enumerate(cfg.sources):
        problems += check_path(src.path, f"data.sources[{k}].path")
        if src.weight < 0:
            problems.append(f"data.sources[{k}].weight={src.weight} must be >= 0")
        if src.format not in ("",) + FORMATS:
            problems.append(f"data.sources[{k}].format={src.format!r}: use one of {FORMATS}")
    if cfg.eval_path:
        problems += check_path(cfg.eval_path, "data.eval_path")
    if cfg.image_root and not Path(cfg.image_root).is_dir():
        problems.append(f"data.image_root={cfg.image_root!r} is not a folder")
    if cfg.overflow not in OVERFLOW_POLICIES:
        problems.append(f"data.overflow={cfg.overflow!r}: use one of {', '.join(OVERFLOW_POLICIES)}")
    if cfg.on_error not in ("skip", "error"):
        problems.append(f"data.on_error={cfg.on_error!r}: use skip or error")
    if cfg.format not in FORMATS:
        problems.append(f"data.format={cfg.format!r}: use one of {', '.join(FORMATS)}")
    return problems
