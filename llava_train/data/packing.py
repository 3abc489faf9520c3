"""Multimodal packing (`data.packing=true`): several samples per row, attention kept inside each sample.

A packed row is the concatenation of whole samples (first-fit decreasing up to `max_length`), with
- `position_ids` restarting at 0 for every sample (and for the row's padding tail),
- no `attention_mask`: transformers 5 (`masking_utils.find_packed_sequence_indices`) then reads the
  sample boundaries from the restarting position ids and builds a block-diagonal causal mask for
  sdpa/eager; flash-attention 2 uses the same position ids for its varlen kernel. This is the
  supported mechanism: a 2D attention mask would switch the detection off;
- the first label of every sample set to IGNORE_INDEX, so no token is trained to predict across a
  boundary (it is never trained anyway: every sample starts with its prompt);
- each sample's images, in row order, so `pixel_values`/`image_sizes` follow the image tokens.
The loss (sum over trained tokens / their count) then equals the mean token loss of the same samples
unpacked (tests/data/test_packing.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from llava_train.constants import IGNORE_INDEX, IMAGE_SIZES, INPUT_IDS, LABELS, PIXEL_VALUES
from llava_train.data.collate import pad_patches

POSITION_IDS = "position_ids"


def pack_bins(order: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: samples into rows whose total length is at most `capacity`.

    A sample longer than `capacity` gets a row of its own (the encoder already truncates to
    max_length, so this only happens with estimated lengths). Rows keep samples in the given order.
    """
    ranked = sorted(order, key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in ranked:
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


@dataclass
class PackingCollator:
    """Packs a batch of samples into rows of at most `max_length` tokens (see module docstring)."""

    pad_token_id: int
    max_length: int
    pad_to_multiple_of: int = 1

    def rows(self, items: list[dict[str, Any]]) -> list[list[int]]:
        lengths = [len(it[INPUT_IDS]) for it in items]
        return pack_bins(range(len(items)), lengths, self.max_length)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        items = [it for it in items if it is not None]  # fetch errors are counted by the dataset
        rows = self.rows(items)
        widths = [sum(len(items[i][INPUT_IDS]) for i in row) for row in rows]
        m = self.pad_to_multiple_of
        width = ((max(widths) + m - 1) // m) * m
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        # Padding restarts at 0 too: it forms its own "sample" and never attends to a real one.
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        pixels: list[torch.Tensor] = []
        sizes: list[list[int]] = []
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                it = items[i]
                n = len(it[INPUT_IDS])
                ids[r, at: at + n] = torch.as_tensor(it[INPUT_IDS])
                labels[r, at: at + n] = torch.as_tensor(it[LABELS])
                labels[r, at] = IGNORE_INDEX
                pos[r, at: at + n] = torch.arange(n)
                at += n
                pixels.extend(it.get(PIXEL_VALUES, []))
                sizes.extend(it.get(IMAGE_SIZES, []))
            pos[r, at:] = torch.arange(width - at)
        batch = {INPUT_IDS: ids, LABELS: labels, POSITION_IDS: pos}
        if pixels:
            batch[PIXEL_VALUES] = pad_patches(pixels)
            batch[IMAGE_SIZES] = torch.tensor(sizes, dtype=torch.long)
        return batch
