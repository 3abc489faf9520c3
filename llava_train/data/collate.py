"""Batching: right padding for training (left for generation), pixel patches padded to the batch max.

LlavaNext takes each image's real patch count from `image_sizes` and ignores the padding, so padding
patches only to the largest image in the batch (instead of the processor's fixed 5) gives the same
loss with less memory and compute ("dynamic patch padding"). Text-only samples simply contribute no
images; a batch without any image carries no pixel keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llava_train.constants import ATTENTION_MASK, IGNORE_INDEX, IMAGE_SIZES, INPUT_IDS, LABELS, PIXEL_VALUES


def pad_patches(pixel_values: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-image patch tensors (n_i, C, H, W) into (images, max n_i, C, H, W), zero-padded."""
    most = max(p.shape[0] for p in pixel_values)
    out = pixel_values[0].new_zeros((len(pixel_values), most, *pixel_values[0].shape[1:]))
    for k, p in enumerate(pixel_values):
        out[k, : p.shape[0]] = p
    return out


@dataclass
class Collator:
    pad_token_id: int
    padding_side: str = "right"  # "left" for batched generation
    pad_to_multiple_of: int = 1

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        # The datasets replace a sample that fails at fetch (ExampleDataset); None from another dataset
        # means a dropped sample, and a batch left with none is an error worth naming, not a max() crash.
        items = [it for it in items if it is not None]
        if not items:
            raise ValueError("every sample of this batch failed to load (see the skip warnings above)")
        longest = max(len(it[INPUT_IDS]) for it in items)
        m = self.pad_to_multiple_of
        longest = ((longest + m - 1) // m) * m
        ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        has_labels = LABELS in items[0]
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it[INPUT_IDS])
            sl = slice(0, n) if self.padding_side == "right" else slice(longest - n, longest)
            ids[row, sl] = it[INPUT_IDS]
            mask[row, sl] = 1
            if has_labels:
                labels[row, sl] = it[LABELS]
        batch = {INPUT_IDS: ids, ATTENTION_MASK: mask}
        if has_labels:
            batch[LABELS] = labels
        pixels = [p for it in items for p in it.get(PIXEL_VALUES, [])]
        if pixels:
            batch[PIXEL_VALUES] = pad_patches(pixels)
            batch[IMAGE_SIZES] = torch.tensor([s for it in items for s in it.get(IMAGE_SIZES, [])], dtype=torch.long)
        return batch
