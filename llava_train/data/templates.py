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
`data.dataset.Encoder` prepends it as a token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

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

    def pieces(self, turns: list[Turn], add_generation_prompt: bool = False) -> list[Piece]:
        """Render `turns` (system?, then alternating user/assistant) into pieces."""
        system = self.default_system
        body = turns
        if turns and turns[0].role == "system":
            system, body = turns[0].text, turns[1:]
        out: list[Piece] = []
        if system and not self.system_in_first_user:
            out.append(Piece(self.system.format(system=system), False))
        for i, turn in enumerate(body):
            if turn.role == "user":
                text = turn.text
                if i == 0 and system and self.system_in_first_user:
                    text = self.system.format(system=system) + text
                out.append(Piece(self.user.format(text=text), False))
            else:
                out.append(Piece(self.reply.format(text=turn.text), True))
                if self.after_reply:
                    out.append(Piece(self.after_reply, False))
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
        `pieces`, so `add_generation_prompt` makes no difference."""
        return _jinja(self)


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
    ),
}

# The special tokens each family's tokenizer has (tests add them to the Mistral tokenizer).
SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "mistral": (),
    "vicuna": (),
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "qwen": ("<|im_start|>", "<|im_end|>"),
}


def get_family(name: str) -> PromptFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown prompt family {name!r}; choose one of {sorted(FAMILIES)}") from None
