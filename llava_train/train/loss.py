"""Causal-LM loss computed only where labels are trained.

The output head over a 32k-150k vocabulary at every position dominates a step when only the replies
are trained (one image alone is ~2,000 untrained positions). Passing the boolean mask of trained
positions as `logits_to_keep` makes the model project only those hidden states; the cross entropy is
then identical to the model's own loss (same tokens, same mean), at a fraction of the cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llava_train.constants import IGNORE_INDEX, LABELS


def trained_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over positions whose next token is trained, the targets in row-major order)."""
    shifted = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = shifted != IGNORE_INDEX
    return keep, shifted[shifted != IGNORE_INDEX]


def sparse_inputs(inputs: dict) -> dict:
    """The model inputs with `logits_to_keep` = the trained positions (labels kept for the loss)."""
    return {**inputs, "logits_to_keep": trained_positions(inputs[LABELS])[0], "use_cache": False}


def trained_token_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Sum of token cross entropies over trained tokens / `num_items_in_batch` (or their count), from a
    forward run with `sparse_inputs` (logits for the trained positions only, in row-major order). Has the
    signature of HF Trainer's `compute_loss_func`."""
    _, targets = trained_positions(labels)
    logits = outputs.logits.reshape(-1, outputs.logits.shape[-1]).float()
    total = F.cross_entropy(logits, targets, reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else max(targets.numel(), 1)
    return total / denom


def sparse_lm_loss(model, inputs: dict, num_items_in_batch=None):
    """(loss over trained tokens, outputs) of one forward that projects only the trained positions."""
    inputs = sparse_inputs(inputs)
    labels = inputs.pop(LABELS)
    outputs = model(**inputs)
    return trained_token_loss(outputs, labels, num_items_in_batch), outputs
