"""Reading conversation data into one record shape.

Supported inputs: LLaVA JSON (a list) or JSONL with ``conversations`` (``from``: human/gpt/system,
also user/assistant; ``<image>`` placeholders; ``image`` a string or a list), and HF ``messages``
(``[{role, content: [{type: image} | {type: text, text}] | str}]`` with ``images``).
Every problem is reported as a `DataError` naming the file, the sample and the field.
"""

from __future__ import annotations

import json
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


def read_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(index, row) of a JSON list or JSONL file; a malformed JSONL line comes as a `DataError` row
    (so `data.on_error=skip` can count it), a malformed JSON list raises."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, DataError(f"malformed JSON on line {lineno + 1}: {exc.msg} (column {exc.colno}); "
                                        "fix or remove that line", source=str(path), index=lineno,
                                        kind="malformed_json")
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
                        source=str(path), kind="malformed_json") from None
    if not isinstance(data, list):
        raise DataError("expected a JSON list of samples (or use .jsonl, one sample per line)", source=str(path))
    yield from enumerate(data)


def _text(value: Any, err) -> str:
    if not isinstance(value, str):
        raise err(f"text must be a string, got {type(value).__name__}", "non_string_text")
    return value


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
    image = row.get("image")
    if image is None:
        images: list[ImageRef] = []
    elif isinstance(image, (str, bytes, dict)):  # a dict is a datasets.Image value {bytes, path}
        images = [image]
    else:
        images = list(image)
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
    images = row.get("images") or []
    if isinstance(images, (str, bytes, dict)):
        images = [images]
    return Conversation(id=str(sid), turns=turns, images=list(images), source=source, index=index,
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


def load_rows(path: str | Path) -> list[tuple[int, Any]]:
    """Raw rows of a JSON/JSONL file with their index (cheap: conversion happens per sample)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist (set data.train_path / data.eval_path)")
    rows = list(read_rows(path))
    for _, row in rows:
        if isinstance(row, DataError):
            raise row
    return rows


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
