"""Reading conversation data into one record shape.

Supported inputs: LLaVA JSON (a list) or JSONL with ``conversations`` (``from``: human/gpt/system,
also user/assistant; ``<image>`` placeholders; ``image`` a string or a list), and HF ``messages``
(``[{role, content: [{type: image} | {type: text, text}] | str}]`` with ``images``).
Every problem is reported as a `DataError` naming the file, the sample and the field.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Union

from llava_train.constants import IMAGE_TOKEN

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class DataError(ValueError):
    """A sample that cannot be used, with where it is and what to do about it."""

    def __init__(self, message: str, *, source: str = "", index: int | None = None, sample_id: Any = None,
                 field: str = "", kind: str = "invalid"):
        self.source, self.index, self.sample_id, self.field, self.kind = source, index, sample_id, field, kind
        where = []
        if source:
            where.append(f"file {source}")
        if index is not None:
            where.append(f"sample #{index}")
        if sample_id is not None:
            where.append(f"id {sample_id!r}")
        if field:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant
    text: str  # may contain <image> placeholders


ImageRef = Union[str, bytes, dict]  # a path, encoded bytes, or a datasets.Image value {bytes, path}


@dataclass
class Conversation:
    """A normalised sample: turns with `<image>` placeholders, and the images they refer to in order."""

    id: str
    turns: list[Turn]
    images: list[ImageRef] = field(default_factory=list)
    source: str = ""
    index: int = -1
    question_type: str = ""  # optional tag for per-type eval metrics

    def error(self, message: str, *, field: str = "", kind: str = "invalid") -> DataError:
        return DataError(message, source=self.source, index=self.index, sample_id=self.id, field=field, kind=kind)


def _decode(raw: bytes, path: Path, index: int | None, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} is not UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); the file may "
                        "be Latin-1 or another encoding: re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
                        source=str(path), index=index, kind="bad_encoding") from None


def _loads(text: str, path: Path, index: int | None, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        fix = "fix or remove that line" if index is not None else f"fix it (line {exc.lineno})"
        raise DataError(f"malformed JSON {where}: {exc.msg} (column {exc.colno}); {fix}",
                        source=str(path), index=index, kind="malformed_json") from None
    except RecursionError:
        raise DataError(f"JSON {where} is nested too deeply to read (over ~{sys.getrecursionlimit()} levels); "
                        "flatten or remove it", source=str(path), index=index, kind="too_deep") from None


def parse_line(raw: bytes, path: Path, lineno: int) -> Any:
    """One JSONL record (`raw`: the bytes of line `lineno`, 0-based) as a row, or a `DataError` row for a
    line that is not UTF-8, not JSON or nested too deeply (so `data.on_error=skip` can count it)."""
    try:
        text = _decode(raw.removeprefix(b"\xef\xbb\xbf") if lineno == 0 else raw, path, lineno, f"line {lineno + 1}")
        return _loads(text, path, lineno, f"on line {lineno + 1}")
    except DataError as err:
        return err


def read_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(index, row) of a JSON list or JSONL file; a bad JSONL line comes as a `DataError` row (so
    `data.on_error=skip` can count it), a bad JSON list raises. JSONL is split on `\\n` only: U+2028,
    U+0085 and other characters `str.splitlines` would split on are legal inside JSON strings."""
    raw = path.read_bytes()
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(raw.split(b"\n")):
            if not line.strip():
                continue
            yield lineno, parse_line(line, path, lineno)
        return
    data = _loads(_decode(raw.removeprefix(b"\xef\xbb\xbf"), path, None, "the file"), path, None, "in the file")
    if not isinstance(data, list):
        raise DataError("expected a JSON list of samples (or use .jsonl, one sample per line)", source=str(path))
    yield from enumerate(data)


def _text(value: Any, err) -> str:
    if not isinstance(value, str):
        raise err(f"text must be a string, got {type(value).__name__}", "non_string_text")
    return value


def _is_ref(value: Any) -> bool:
    if isinstance(value, dict):  # a datasets.Image value {bytes, path}
        return isinstance(value.get("bytes"), (bytes, bytearray)) or isinstance(value.get("path"), str)
    return isinstance(value, (str, bytes, bytearray)) or type(value).__module__.startswith("PIL.")


def image_refs(value: Any, err) -> list[ImageRef]:
    """A sample's image field as a list of references (path strings, bytes, {bytes, path}); anything
    else (a number, a nested list, null inside the list) is `err(message)`."""
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for k, item in enumerate(items):
        if not _is_ref(item):
            raise err(f"image {k} is {type(item).__name__} {item!r:.40}: an image must be a path string, bytes or "
                      "a {bytes, path} object")
    return items


def from_llava(row: dict, *, source: str, index: int) -> Conversation:
    sid = row.get("id", index) if isinstance(row, dict) else index

    def err(msg: str, kind: str = "invalid", fld: str = "conversations") -> DataError:
        return DataError(msg, source=source, index=index, sample_id=sid, field=fld, kind=kind)

    if not isinstance(row, dict) or "conversations" not in row:
        raise err("missing 'conversations' (LLaVA format: {id, image, conversations: [{from, value}]})")
    if not isinstance(row["conversations"], list):
        raise err("'conversations' must be a list of {from, value} turns")
    turns = []
    for j, msg in enumerate(row["conversations"]):
        if not isinstance(msg, dict) or "from" not in msg or "value" not in msg:
            raise err(f"turn {j} must be an object with 'from' and 'value'")
        role = ROLE_ALIASES.get(msg["from"])
        if role is None:
            raise err(f"turn {j} has unknown role {msg['from']!r}; use one of {sorted(ROLE_ALIASES)}",
                      "unknown_role")
        turns.append(Turn(role, _text(msg["value"], lambda m, k: err(f"turn {j}: {m}", k))))
    images = image_refs(row.get("image"), lambda m: err(m, "bad_image_ref", "image"))
    return Conversation(id=str(sid), turns=turns, images=images, source=source, index=index,
                        question_type=str(row.get("question_type", "")))


def from_messages(row: dict, *, source: str, index: int) -> Conversation:
    sid = row.get("id", index)

    def err(msg: str, kind: str = "invalid") -> DataError:
        return DataError(msg, source=source, index=index, sample_id=sid, field="messages", kind=kind)

    turns = []
    for j, msg in enumerate(row["messages"]):
        role = ROLE_ALIASES.get(msg.get("role")) if isinstance(msg, dict) else None
        if role is None:
            raise err(f"message {j} has unknown role {msg.get('role') if isinstance(msg, dict) else msg!r}",
                      "unknown_role")
        content = msg.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    parts.append(IMAGE_TOKEN + "\n")
                elif kind == "text":
                    parts.append(_text(part.get("text"), lambda m, k: err(f"message {j}: {m}", k)))
                else:
                    raise err(f"message {j} has a content part of unknown type {kind!r}")
            text = "".join(parts)
        else:
            raise err(f"message {j}: content must be a string or a list of parts", "non_string_text")
        turns.append(Turn(role, text))
    images = image_refs(row.get("images"), lambda m: DataError(m, source=source, index=index, sample_id=sid,
                                                               field="images", kind="bad_image_ref"))
    return Conversation(id=str(sid), turns=turns, images=images, source=source, index=index,
                        question_type=str(row.get("question_type", "")))


def detect_format(row: Any) -> str:
    if isinstance(row, dict) and "conversations" in row:
        return "llava"
    if isinstance(row, dict) and "messages" in row:
        return "messages"
    return "unknown"


def to_conversation(row: Any, *, fmt: str, source: str, index: int) -> Conversation:
    kind = detect_format(row) if fmt == "auto" else fmt
    if kind == "llava":
        return from_llava(row, source=source, index=index)
    if kind == "messages":
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise DataError("'messages' must be a list of {role, content}", source=source, index=index,
                            sample_id=row.get("id") if isinstance(row, dict) else None, field="messages")
        return from_messages(row, source=source, index=index)
    if kind not in ("auto", "unknown"):
        raise DataError(f"unknown data.format {kind!r}: use auto, llava or messages", source=source, index=index)
    raise DataError("cannot tell the format: expected 'conversations' (LLaVA) or 'messages' (HF)",
                    source=source, index=index, kind="invalid")


def place_images(conv: Conversation, placement: str = "front") -> Conversation:
    """`data.image_placement`: with ``front``, a turn holding exactly one `<image>` is rewritten as
    `<image>\\n` + its text without the placeholder, stripped: LLaVA's `preprocess_multimodal`
    (`value.replace(IMAGE, "").strip()`, then `IMAGE + "\\n" + value`), which is also where every inference
    path (chat templates, `llava chat`) puts an image. Turns with several images keep them where they are
    (their order is their meaning); ``as_written`` changes nothing. Returns `conv`, its turns replaced."""
    if str(getattr(placement, "value", placement)) == "as_written":
        return conv
    if str(getattr(placement, "value", placement)) != "front":
        raise ValueError(f"data.image_placement={placement!r}: use front or as_written")
    turns = []
    for turn in conv.turns:
        if turn.role == "user" and turn.text.count(IMAGE_TOKEN) == 1:
            turn = Turn(turn.role, (IMAGE_TOKEN + "\n" + turn.text.replace(IMAGE_TOKEN, "").strip()).strip())
        turns.append(turn)
    conv.turns = turns
    return conv
