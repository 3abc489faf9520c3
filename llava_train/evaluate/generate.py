"""Generation eval: batched greedy (or sampled) decoding with left padding, exact-match accuracy.

Distributed (DDP or DeepSpeed ZeRO): every rank generates its own shard of the eval set and the
predictions are gathered on all ranks. Under ZeRO-3 the weights are sharded, so each forward
gathers layer parameters with a collective: generation runs with `synced_gpus=True` (ranks that
finish early keep stepping until all are done) and every rank runs the same number of batches
(short shards repeat their last prompt; the repeats are dropped).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from llava_train import ranks
from llava_train.constants import IMAGE_SIZES, INPUT_IDS, PIXEL_VALUES
from llava_train.data.collate import Collator
from llava_train.data.dataset import ConversationDataset
from llava_train.data.images import load_rgb


def normalise(text: str) -> str:
    """Lower case, no surrounding punctuation or articles, single spaces."""
    text = text.lower().strip()
    text = re.sub(r"[^\w\s]", " ", text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@dataclass
class Prediction:
    id: str
    question: str
    reference: str
    prediction: str
    question_type: str = ""

    @property
    def exact(self) -> bool:
        return normalise(self.prediction) == normalise(self.reference)

    @property
    def contains(self) -> bool:
        ref = normalise(self.reference)
        return bool(ref) and ref in normalise(self.prediction)


def _prompt_item(ds: ConversationDataset, i: int) -> dict[str, Any]:
    conv, sizes = ds.items[i]
    ids = ds.encoder.encode_prompt(conv, conv.turns[:-1], sizes)
    item: dict[str, Any] = {INPUT_IDS: torch.tensor(ids, dtype=torch.long)}
    if conv.images:
        images = [load_rgb(ref, ds.image_root, conv, k) for k, ref in enumerate(conv.images)]
        item[PIXEL_VALUES] = [torch.as_tensor(p) for p in ds.pixels(images)]
        item[IMAGE_SIZES] = [list(s) for s in sizes]
    return item


def _world() -> tuple[int, int]:
    return ranks.rank(), ranks.world_size()


def _zero3() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


@torch.no_grad()
def generate_predictions(model, ds: ConversationDataset, tokenizer, *, batch_size: int = 16,
                         max_new_tokens: int = 16, indices: Iterable[int] | None = None,
                         do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                         synced_gpus: bool | None = None) -> list[Prediction]:
    """Predictions for the last assistant turn of each sample, in batches (left padded).

    Greedy unless `do_sample`. Under torch.distributed each rank decodes a shard and all ranks return
    every prediction, in the order of `indices`. `synced_gpus`: None = on under DeepSpeed ZeRO-3."""
    order = list(range(len(ds))) if indices is None else list(indices)
    rank, world = _world()
    if world == 1 or not order:
        return _generate(model, ds, tokenizer, order, batch_size, max_new_tokens, do_sample, temperature, top_p)
    import torch.distributed as dist

    shard = order[rank::world]
    # The same number of batches on every rank: synced_gpus needs every rank in every forward.
    per_rank = -(-len(order) // world)
    n_pad = per_rank - len(shard)
    padded = shard + [shard[-1] if shard else order[0]] * n_pad
    mine = _generate(model, ds, tokenizer, padded, batch_size, max_new_tokens, do_sample, temperature, top_p,
                     synced_gpus=_zero3() if synced_gpus is None else synced_gpus)[: len(shard)]
    gathered: list[list[Prediction]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, mine)
    by_index = {i: p for r in range(world) for i, p in zip(order[r::world], gathered[r])}
    return [by_index[i] for i in order]


def _bare_parameters(model) -> list:
    """Parameters held directly by modules that also have submodules (LlavaNext's `image_newline`)."""
    return [p for m in model.modules() if next(m.children(), None) is not None for p in m.parameters(recurse=False)]


def _zero3_gathered(model, enabled: bool):
    """Under ZeRO-3, gather the bare parameters for the whole `generate` call.

    Workaround: transformers 5 `generate` computes the image features before the first forward
    (`_prepare_multimodal_encoder_kwargs_for_generation` -> `get_image_features` -> `pack_image_features`),
    outside any module forward, so DeepSpeed's forward hooks never gather `image_newline` and the
    partitioned (empty) tensor fails "expanded size ... existing size (0)". Submodules (vision tower,
    projector) are gathered by their own hooks. The general rule (parameters used outside a forward must
    be gathered by hand): huggingface/transformers#26112, DeepSpeed's "Gathering Parameters" docs. No
    upstream issue for LlavaNext's generate yet; can go when transformers' generate computes image
    features inside a module forward (check: tests/evaluate/test_zero3_generation.py without this)."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(_bare_parameters(model), modifier_rank=None)


def _generate(model, ds, tokenizer, order, batch_size, max_new_tokens, do_sample, temperature, top_p,
              synced_gpus: bool = False) -> list[Prediction]:
    collate = Collator(pad_token_id=tokenizer.pad_token_id, padding_side="left")
    device = next(p for p in model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    was_training = model.training
    model.eval()
    preds: list[Prediction] = []
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        batch = collate([_prompt_item(ds, i) for i in chunk])
        batch = {k: v.to(device) for k, v in batch.items()}
        if PIXEL_VALUES in batch:
            batch[PIXEL_VALUES] = batch[PIXEL_VALUES].to(dtype)
        with _zero3_gathered(model, _zero3()):
            out = model.generate(**batch, max_new_tokens=max_new_tokens, **sampling, synced_gpus=synced_gpus,
                                 pad_token_id=tokenizer.pad_token_id)  # stops on generation_config's ids
        new = out[:, batch[INPUT_IDS].shape[1]:]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for i, text in zip(chunk, texts):
            conv = ds.conversation(i)
            question = conv.turns[-2].text.replace("<image>", "").strip()
            preds.append(Prediction(id=conv.id, question=question, reference=conv.turns[-1].text,
                                    prediction=text.strip(), question_type=ds.question_type(i)))
    if was_training:
        model.train()
    return preds


def write_predictions(preds: list[Prediction], path) -> None:
    """predictions.jsonl: one {id, question, reference, prediction[, question_type]} per line."""
    import json

    with open(path, "w") as f:
        for p in preds:
            row = {"id": p.id, "question": p.question, "reference": p.reference, "prediction": p.prediction}
            if p.question_type:
                row["question_type"] = p.question_type
            f.write(json.dumps(row) + "\n")


def metrics(preds: list[Prediction]) -> dict[str, Any]:
    n = len(preds)
    out: dict[str, Any] = {
        "count": n,
        "exact_match": sum(p.exact for p in preds) / n if n else 0.0,
        "contains_match": sum(p.contains for p in preds) / n if n else 0.0,
    }
    types = sorted({p.question_type for p in preds if p.question_type})
    if types:
        out["per_question_type"] = {
            t: sum(p.exact for p in preds if p.question_type == t) / sum(p.question_type == t for p in preds)
            for t in types
        }
    return out
