"""Prompt families: how each LLaVA-NeXT checkpoint wants a conversation written.

A family renders a conversation into *pieces* of text, each either scaffolding/prompt (never trained)
or a reply (trained: the separator before the reply, the reply and the end-of-turn token). The
generation prompt for the first k user turns is exactly the concatenation of the pieces before reply
k, so the training form equals the inference form ("prefix property"; checked again on token ids by
`data.dataset`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from llava_train.data.formats import Turn

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
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
    """

    name: str
    user: str
    reply: str
    eot: str
    system: str = "{system}"
    default_system: Optional[str] = None
    system_in_first_user: bool = False  # mistral/llama-2 style: system text goes inside the first [INST]
    after_reply: str = ""
    chat_template: str = ""

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
        """The inference prompt for `turns`, which must end with a user turn."""
        if not turns or turns[-1].role != "user":
            raise ValueError("a generation prompt needs the conversation to end with a user turn")
        return "".join(p.text for p in self.pieces(turns, add_generation_prompt=True))


# Jinja chat templates equivalent to the renderers above (saved with the processor, so plain
# transformers `apply_chat_template` / pipelines produce the same prompt as training).
_MISTRAL_JINJA = (
    "{% set first_user = namespace(done=false) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% if not first_user.done and messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{{ messages[0]['content'] }}"
    "{% else %}{% for c in messages[0]['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}\n\n{% endif %}"
    "{% set first_user.done = true %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} [/INST]"
    "{% elif message['role'] == 'assistant' %} "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s>"
    "{% endif %}"
    "{% endfor %}"
)

FAMILIES: dict[str, PromptFamily] = {
    # llava-v1.6-mistral-7b: "[INST] <image>\nWhat is shown in this image? [/INST]"
    "mistral": PromptFamily(
        name="mistral",
        system="{system}\n\n",
        system_in_first_user=True,
        user="[INST] {text} [/INST]",
        reply=" {text}</s>",
        eot="</s>",
        chat_template=_MISTRAL_JINJA,
    ),
    # llava-v1.6-vicuna-7b/13b: "<system> USER: <image>\n... ASSISTANT:"
    "vicuna": PromptFamily(
        name="vicuna",
        system="{system} ",
        default_system=VICUNA_SYSTEM,
        user="USER: {text} ASSISTANT:",
        reply=" {text}</s>",
        eot="</s>",
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
    # llama3-llava-next-8b
    "llama3": PromptFamily(
        name="llama3",
        system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        reply="{text}<|eot_id|>",
        eot="<|eot_id|>",
    ),
    # llava-next-72b / 110b (Qwen-1.5 chatml)
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


def get_family(name: str) -> PromptFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown prompt family {name!r}; choose one of {sorted(FAMILIES)}") from None
