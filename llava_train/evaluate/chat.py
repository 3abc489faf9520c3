"""`llava chat`: generation from image path(s) and a prompt with an adapter, a merged model or a base.

Three modes: one-shot (`prompt=...`, reply on stdout), batch (`input=requests.jsonl`, replies to a
JSONL) and interactive (neither: read turns from stdin; `/image PATH` attaches an image to the next
turn, `/reset` clears the history, `/quit` or end of input stops).
Prompts come from the processor's own chat template: the family's training template, saved with every
folder this project writes (for another checkpoint, `model.family`'s is set at load), the same path
`transformers.pipeline("image-text-to-text")` takes. Generation stops on the family's end-of-turn token.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from PIL import Image

from llava_train.config.jobs import ChatJobConfig
from llava_train.data.templates import get_family
from llava_train.model.inference import load_for_inference, load_processor_for, resolve
from llava_train.model.load import processor_family, set_generation_stop


def _message(role: str, text: str, n_images: int = 0) -> dict[str, Any]:
    return {"role": role, "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


class Chat:
    """A loaded model and processor, and how to generate with them."""

    def __init__(self, cfg: ChatJobConfig):
        self.cfg = cfg
        resolved = resolve(cfg.model.path, cfg.base_model, cfg.model)
        self.processor = load_processor_for(resolved, cfg.model.family)
        self.processor.tokenizer.padding_side = "left"
        self.family = get_family(processor_family(self.processor) or cfg.model.family)
        self.model = load_for_inference(resolved, cfg.model.dtype, cfg.model.attn_implementation)
        set_generation_stop(self.model.generation_config, self.processor.tokenizer, self.family)

    @torch.no_grad()
    def generate(self, conversations: list[list[dict]], images: list[list[Image.Image]]) -> list[str]:
        """Replies to a batch of conversations (each ending with a user turn), left padded."""
        tok = self.processor.tokenizer
        inputs = self.inputs(conversations, images).to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        c = self.cfg
        sampling = {"do_sample": True, "temperature": c.temperature, "top_p": c.top_p} if c.do_sample else {
            "do_sample": False}
        out = self.model.generate(**inputs, max_new_tokens=c.max_new_tokens, pad_token_id=tok.pad_token_id,
                                  **sampling)  # stops on generation_config.eos_token_id (family's end-of-turn)
        return [t.strip() for t in tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]

    def inputs(self, conversations: list[list[dict]], images: list[list[Image.Image]]):
        """The model inputs of a batch: each conversation rendered by the processor's chat template (the
        training prompt), images expanded, left padded."""
        texts = [self.processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        flat = [im for ims in images for im in ims]
        return self.processor(images=flat or None, text=texts, padding=True, return_tensors="pt")

    def one_turn(self, prompt: str, image_paths: list[str]) -> str:
        conv = self._start() + [_message("user", prompt, len(image_paths))]
        return self.generate([conv], [[load_image(p) for p in image_paths]])[0]

    def _start(self) -> list[dict]:
        return [_message("system", self.cfg.system)] if self.cfg.system else []


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found")
    return Image.open(path).convert("RGB")


def read_requests(path: str | Path) -> list[dict]:
    """Batch requests: one JSON object per line with "prompt" and optional "images" and "id"."""
    out = []
    base = Path(path).parent
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{n}: each request needs a \"prompt\" string")
        images = [str(p if Path(p).is_absolute() else base / p) for p in row.get("images", [])]
        out.append({"id": row.get("id", str(n)), "prompt": row["prompt"], "images": images})
    return out


def run_batch(chat: Chat, path: str, output: str) -> Path:
    requests = read_requests(path)
    dest = Path(output or f"{Path(path).with_suffix('')}.replies.jsonl")
    bs = chat.cfg.batch_size
    with open(dest, "w") as f:
        for start in range(0, len(requests), bs):
            chunk = requests[start: start + bs]
            convs = [chat._start() + [_message("user", r["prompt"], len(r["images"]))] for r in chunk]
            replies = chat.generate(convs, [[load_image(p) for p in r["images"]] for r in chunk])
            for r, reply in zip(chunk, replies):
                f.write(json.dumps({**r, "reply": reply}) + "\n")
    return dest


def interactive(chat: Chat, stdin: TextIO, stdout: TextIO, images: list[str]) -> None:
    history = chat._start()
    pending = list(images)
    seen: list[Image.Image] = []
    print("llava chat: /image PATH attaches an image, /reset clears, /quit ends", file=stdout, flush=True)
    for line in stdin:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history, pending, seen = chat._start(), [], []
            continue
        if line.startswith("/image "):
            pending.append(line[len("/image "):].strip())
            continue
        history.append(_message("user", line, len(pending)))
        seen += [load_image(p) for p in pending]
        pending = []
        reply = chat.generate([history], [seen])[0]
        history.append(_message("assistant", reply))
        print(f"assistant: {reply}", file=stdout, flush=True)


def run(cfg: ChatJobConfig) -> None:
    torch.manual_seed(cfg.seed)
    chat = Chat(cfg)
    if cfg.input:
        dest = run_batch(chat, cfg.input, cfg.output)
        print(f"wrote replies to {dest}", flush=True)
    elif cfg.prompt:
        print(chat.one_turn(cfg.prompt, list(cfg.images)), flush=True)
    else:
        interactive(chat, sys.stdin, sys.stdout, list(cfg.images))
