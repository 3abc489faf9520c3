"""Prompt families: how each LLaVA-NeXT checkpoint wants a conversation written.

A family renders a conversation into *pieces* of text, each either scaffolding/prompt (never trained)
or a reply (trained: the separator before the reply, the reply and the end-of-turn token). The
generation prompt for the first k user turns is exactly the concatenation of the pieces before reply
k, so the training form equals the inference form ("prefix property"; checked again on token ids by
`data.dataset`).

Sources of each format (single user turn, one image, default system prompt):
- mistral, vicuna, chatml (llava-v1.6-34b), qwen (llava-next-72b/110b): the prompt strings of the
  transformers LLaVA-NeXT docs (docs/source/en/model_doc/llava_next.md), and LLaVA's `conversation.py`
  (`conv_mistral_instruct`, `conv_vicuna_v1`, `conv_chatml_direct`, LLaVA-NeXT `conv_qwen`) for multi-turn.
- llama3 (llama3-llava-next-8b): the docs string, whose `<|start_header_id|><|start_header_id|>user` is a
  typo in the docs (LLaVA-NeXT's `conv_llava_llama_3` renders Llama-3's own chat template, one header
  token per turn), so the header appears once here.
BOS: mistral/vicuna start with `<s>` and llama3 with `<|begin_of_text|>` (their tokenizers add it);
Yi (34b) and Qwen tokenizers add none. The BOS is not part of the prompt *text* (as in the docs strings);
`data.encoder.Encoder` prepends it as a token.

Tokenisation (`TemplateTokenizer`), one rule for every family:
- the text is cut before and after every trained piece (reply = separator + reply + end-of-turn) and at
  every control token (the family's own special tokens, `<image>`); each run of text between cuts is
  tokenised alone, exactly as the tokenizer would tokenise it inside the whole string (no extra
  sentencepiece prefix space). So a reply is tokenised apart from the header before it, as the originals
  do: LLaVA-NeXT `preprocess_qwen` tokenises each message's content alone, Meta's Llama-3 template
  renders (and LLaVA-NeXT `preprocess_llama3` tokenises) each message alone with its content *trimmed*,
  mistral-common encodes each assistant message alone; LLaVA `conv_llava_v1` (vicuna) tokenises the
  whole prompt, which cuts the same way because every reply starts with the separator space.
  Whitespace: llama3 trims every message (Meta's `| trim`); the other families keep it, and a reply that
  starts with a newline trains that newline as its own token(s) after the header (qwen: `assistant\n`
  then `\n...`, never one merged `\n\n` token).
- text *in the data* (message contents) that spells a special token (`</s>`, `<|im_end|>`, ...) is plain
  text by default (`data.special_tokens_in_text=text`: tokenised with the tokenizer's
  `split_special_tokens`), so a data row can neither end a sequence mid-reply nor forge a turn boundary;
  `parse` gives such text its control id (the old behaviour). The template's own control tokens and the
  `<image>` placeholders are always control tokens.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Optional

from llava_train.config.choices import SpecialTokensInText
from llava_train.constants import IMAGE_TOKEN
from llava_train.data.formats import Turn

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)


@dataclass(frozen=True)
class Piece:
    text: str
    trained: bool
    # (text, is_content) in order, "".join == text: content is message text from the data, the rest is
    # the template's own scaffolding.
    parts: tuple[tuple[str, bool], ...] = field(default=(), compare=False)

    @property
    def content(self) -> str:
        return "".join(t for t, is_content in self.parts if is_content)


@dataclass(frozen=True)
class PromptFamily:
    """One checkpoint family's prompt format.

    ``system`` wraps the system prompt at the start (empty system: no block unless `default_system`).
    ``user`` wraps a user turn and ends with the assistant header (the generation prompt ends there).
    ``reply`` wraps an assistant reply, including the separator before it and the end-of-turn token;
    it is what gets trained. ``after_reply`` is untrained scaffolding between a reply and the next turn.
    ``bos`` is the begin-of-sequence token the tokenizer puts first ("" for none).
    """

    name: str
    user: str
    reply: str
    eot: str
    system: str = "{system}"
    default_system: Optional[str] = None
    system_in_first_user: bool = False  # mistral/llama-2 style: system text goes inside the first [INST]
    after_reply: str = ""
    bos: str = ""
    trim: bool = False  # strip whitespace around every message's text (Meta's Llama-3 template: `| trim`)
    controls: tuple[str, ...] = ()  # special tokens the scaffolding uses (besides bos/eot)

    @property
    def control_tokens(self) -> tuple[str, ...]:
        return tuple(t for t in dict.fromkeys((self.bos, self.eot, *self.controls)) if t)

    def message_text(self, text: str) -> str:
        """A message's text as the family renders it (llama3: trimmed)."""
        return text.strip() if self.trim else text

    def pieces(self, turns: list[Turn], add_generation_prompt: bool = False) -> list[Piece]:
        """Render `turns` (system?, then alternating user/assistant) into pieces.

        An empty system message means "no system prompt", as in the originals
        (LLaVA's `conv.system` empty writes nothing); no system message means the family's default."""
        system = self.default_system
        body = turns
        if turns and turns[0].role == "system":
            system, body = self.message_text(turns[0].text), turns[1:]
        out: list[Piece] = []
        if system and not self.system_in_first_user:
            out.append(_piece(False, _fill(self.system, "system", system)))
        for i, turn in enumerate(body):
            if turn.role == "user":
                parts = [(self.message_text(turn.text), True)]
                if i == 0 and system and self.system_in_first_user:
                    parts = _fill(self.system, "system", system) + parts
                before, after = self.user.split("{text}")
                out.append(_piece(False, [(before, False), *parts, (after, False)]))
            else:
                out.append(_piece(True, _fill(self.reply, "text", self.message_text(turn.text))))
                if self.after_reply:
                    out.append(_piece(False, [(self.after_reply, False)]))
        if not add_generation_prompt and body and body[-1].role == "user":
            raise ValueError("a training conversation must end with an assistant reply")
        return out

    def generation_prompt(self, turns: list[Turn]) -> str:
        """The inference prompt for `turns`, which must end with a user turn (BOS not included)."""
        if not turns or turns[-1].role != "user":
            raise ValueError("a generation prompt needs the conversation to end with a user turn")
        return "".join(p.text for p in self.pieces(turns, add_generation_prompt=True))

    @property
    def chat_template(self) -> str:
        """An equivalent Jinja chat template (saved with a processor so that plain transformers
        `apply_chat_template` produces the training prompt; replies are wrapped in `{% generation %}`
        for `return_assistant_tokens_mask`). A user turn always ends with the assistant header, as in
        `pieces`, so `add_generation_prompt` makes no difference. It starts with a comment naming the
        family (`family_of` reads it back from a saved processor)."""
        return _MARK.format(name=self.name) + _jinja(self)


_MARK = "{{#- llava-train prompt family: {name} -#}}"
_MARK_RX = re.compile(r"^\{#- llava-train prompt family: (\w+) -#\}")


def family_of(chat_template) -> Optional[str]:
    """The prompt family a saved chat template was written for by this project (None: another template)."""
    m = _MARK_RX.match(chat_template) if isinstance(chat_template, str) else None
    return m.group(1) if m and m.group(1) in FAMILIES else None


def _fill(fmt: str, key: str, value: str) -> list[tuple[str, bool]]:
    before, after = fmt.split("{" + key + "}")
    return [(before, False), (value, True), (after, False)]


def _piece(trained: bool, parts: list[tuple[str, bool]]) -> Piece:
    parts = [(t, c) for t, c in parts if t]
    return Piece("".join(t for t, _ in parts), trained, tuple(parts))


def _lit(text: str) -> str:
    return "{{ " + json.dumps(text) + " }}" if text else ""


def _wrap(fmt: str, key: str, inner: str) -> str:
    before, after = fmt.split("{" + key + "}")
    return _lit(before) + inner + _lit(after)


def _jinja(f: PromptFamily) -> str:
    content = (
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + _lit(IMAGE_TOKEN + "\n") + "{% elif c['type'] == 'text' %}"
        "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    )
    if f.trim:  # render the content into a variable, then trim it (Meta's Llama-3 template)
        content = "{% set c %}" + content + "{% endset %}{{ c | trim }}"
    sys_text = content.replace("m['content']", "messages[0]['content']")
    default = json.dumps(f.default_system or "")
    out = "{% set ns = namespace(sys=" + default + ", first=true) %}"
    out += "{% if messages[0]['role'] == 'system' %}{% set ns.sys %}" + sys_text + "{% endset %}{% endif %}"
    if not f.system_in_first_user:
        out += "{% if ns.sys %}" + _wrap(f.system, "system", "{{ ns.sys }}") + "{% endif %}"
    out += "{% for m in messages %}{% if m['role'] == 'user' %}"
    user_inner = ""
    if f.system_in_first_user:
        user_inner += "{% if ns.first and ns.sys %}" + _wrap(f.system, "system", "{{ ns.sys }}") + "{% endif %}"
    user_inner += "{% set ns.first = false %}" + content
    out += _wrap(f.user, "text", user_inner)
    out += "{% elif m['role'] == 'assistant' %}{% generation %}" + _wrap(f.reply, "text", content)
    out += "{% endgeneration %}" + _lit(f.after_reply) + "{% endif %}{% endfor %}"
    return out


FAMILIES: dict[str, PromptFamily] = {
    # llava-v1.6-mistral-7b: "[INST] <image>\nWhat is shown in this image? [/INST]"
    "mistral": PromptFamily(
        name="mistral",
        system="{system}\n\n",
        system_in_first_user=True,
        user="[INST] {text} [/INST]",
        reply=" {text}</s>",
        eot="</s>",
        bos="<s>",
    ),
    # llava-v1.6-vicuna-7b/13b: "<system> USER: <image>\n... ASSISTANT:"
    "vicuna": PromptFamily(
        name="vicuna",
        system="{system} ",
        default_system=VICUNA_SYSTEM,
        user="USER: {text} ASSISTANT:",
        reply=" {text}</s>",
        eot="</s>",
        bos="<s>",
    ),
    # llava-v1.6-34b (Nous-Hermes-2-Yi-34B, chatml without newlines between turns)
    "chatml": PromptFamily(
        name="chatml",
        system="<|im_start|>system\n{system}<|im_end|>",
        default_system="Answer the questions.",
        user="<|im_start|>user\n{text}<|im_end|><|im_start|>assistant\n",
        reply="{text}<|im_end|>",
        eot="<|im_end|>",
        controls=("<|im_start|>",),
    ),
    # llama3-llava-next-8b (Llama-3-Instruct headers)
    "llama3": PromptFamily(
        name="llama3",
        system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        default_system=LLAMA3_SYSTEM,
        user="<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        reply="{text}<|eot_id|>",
        eot="<|eot_id|>",
        bos="<|begin_of_text|>",
        trim=True,
        controls=("<|start_header_id|>", "<|end_header_id|>"),
    ),
    # llava-next-72b / 110b (Qwen-1.5 chatml, newline after every <|im_end|>)
    "qwen": PromptFamily(
        name="qwen",
        system="<|im_start|>system\n{system}<|im_end|>\n",
        default_system="You are a helpful assistant.",
        user="<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
        reply="{text}<|im_end|>",
        after_reply="\n",
        eot="<|im_end|>",
        controls=("<|im_start|>",),
    ),
}

# The special tokens each family's prompt uses beyond a sentencepiece tokenizer's own <s>/</s>.
SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    name: tuple(t for t in f.control_tokens if t not in ("<s>", "</s>")) for name, f in FAMILIES.items()
}


def get_family(name: str) -> PromptFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown prompt family {name!r}; choose one of {sorted(FAMILIES)}") from None


class TemplateTokenizer:
    """Token ids of rendered pieces, by the rule in the module docstring (BOS not included).

    Uses the tokenizer's `tokenizers` backend directly: a run of text that follows a cut is tokenised
    without the sentencepiece prefix space (`Metaspace(prepend_scheme="first")` adds one only at the very
    start of a string, which is what whole-string tokenisation does)."""

    def __init__(self, tokenizer, family: PromptFamily, special_tokens_in_text: str = SpecialTokensInText.text):
        self._setup(tokenizer, family, SpecialTokensInText(special_tokens_in_text))

    def __getstate__(self):  # DataLoader / doctor workers: `encode_special_tokens` does not survive a pickle
        return {"tok": self.tok, "family": self.family, "mode": self.mode}

    def __setstate__(self, state):
        self._setup(state["tok"], state["family"], state["mode"])

    def _setup(self, tokenizer, family: PromptFamily, mode: SpecialTokensInText):
        self.tok = tokenizer
        self.family = family
        self.mode = mode
        self.split = mode == SpecialTokensInText.text
        controls = [*family.control_tokens, IMAGE_TOKEN]
        self.control_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in controls}
        # Control tokens are cut everywhere in the scaffolding; in message text only <image> is.
        self._scaffold_rx = re.compile("(" + "|".join(re.escape(t) for t in controls) + ")")
        self._content_rx = re.compile("(" + re.escape(IMAGE_TOKEN) + ")")
        # The special-token strings data text may spell (reported by `llava doctor`).
        specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
        specials |= {str(t) for t in tokenizer.get_added_vocab()} if hasattr(tokenizer, "get_added_vocab") else set()
        specials |= set(family.control_tokens)
        specials.discard(IMAGE_TOKEN)
        specials.discard("")
        self.special_strings = tuple(sorted(specials, key=len, reverse=True))
        backend = getattr(tokenizer, "_tokenizer", None)
        self._first = self._rest = None
        if backend is not None:
            self._first, self._rest = copy.deepcopy(backend), copy.deepcopy(backend)
            for b in (self._first, self._rest):  # (a copy does not keep encode_special_tokens)
                b.encode_special_tokens = self.split
                b.no_truncation()
                b.no_padding()
            pre = self._rest.pre_tokenizer
            if type(pre).__name__ == "Metaspace" and str(getattr(pre, "prepend_scheme", "")) == "first":
                pre.prepend_scheme = "never"
                self._rest.pre_tokenizer = pre

    def _run(self, text: str, first: bool) -> list[int]:
        if self._first is None:  # a tokenizer without a `tokenizers` backend
            return self.tok(text, add_special_tokens=False, split_special_tokens=self.split)["input_ids"]
        return (self._first if first else self._rest).encode(text, add_special_tokens=False).ids

    def special_text(self, pieces: list[Piece]) -> list[str]:
        """The special-token strings that message text (not the template) contains."""
        content = "".join(p.content for p in pieces)
        return [t for t in self.special_strings if t in content]

    def encode(self, pieces: list[Piece]) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, the token span of each trained piece)."""
        groups: list[tuple[bool, list[tuple[str, bool]]]] = []
        for piece in pieces:  # runs of untrained pieces, each trained piece alone
            if piece.trained or not groups or groups[-1][0]:
                groups.append((piece.trained, list(piece.parts)))
            else:
                groups[-1][1].extend(piece.parts)
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        for trained, parts in groups:
            start = len(ids)
            run = ""
            for text, is_content in parts:
                rx = self._content_rx if (is_content and self.split) else self._scaffold_rx
                for k, chunk in enumerate(rx.split(text)):
                    if k % 2 == 0:
                        run += chunk
                        continue
                    if run:
                        ids += self._run(run, first=not ids)
                        run = ""
                    ids.append(self.control_ids[chunk])
            if run:
                ids += self._run(run, first=not ids)
            if trained:
                spans.append((start, len(ids)))
        return ids, spans


def set_training_template(processor, family) -> None:
    """Put `family`'s training chat template on the processor and its tokenizer (both are saved)."""
    processor.chat_template = family.chat_template
    processor.tokenizer.chat_template = family.chat_template
