"""Causal-LM loss computed only where labels are trained.

The output head over a 32k-150k vocabulary at every position is costly when only the replies are
trained (one image alone is ~2,000 untrained positions). Passing the boolean mask of trained positions
as `logits_to_keep` makes the model project only those hidden states; the cross entropy is then
identical to the model's own loss (same tokens, same mean), at a fraction of the cost (at 7B the
full head is ~2 % of a step's FLOPs, but ~0.7 GB of fp32 logits per 2,500-token sample).

Many trained tokens (text-heavy data, packed rows, a 150k vocabulary) still make [trained, vocab]
logits large. Two ways never to hold them all at once, both on the trained positions only:
- `chunk_tokens > 0`: pure torch, any device. The model returns the trained positions' hidden states
  (its head bypassed for this call), and each chunk of `chunk_tokens` positions is projected and scored
  under `torch.utils.checkpoint`, so its logits are freed after the forward and recomputed in backward.
- `liger=True`: Liger-Kernel's `LigerFusedLinearCrossEntropyLoss` (Triton, CUDA only) on the same
  hidden states.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


def sparse_lm_loss(model, inputs: dict, num_items_in_batch=None, *, chunk_tokens: int = 0, liger: bool = False):
    """(loss over trained tokens, outputs) of one forward that projects only the trained positions; with
    `chunk_tokens` / `liger` the head is applied by the loss itself (see the module docstring)."""
    inputs = sparse_inputs(inputs)
    labels = inputs.pop(LABELS)
    if chunk_tokens <= 0 and not liger:
        outputs = model(**inputs)
        return trained_token_loss(outputs, labels, num_items_in_batch), outputs
    _, targets = trained_positions(labels)
    denom = num_items_in_batch if num_items_in_batch is not None else max(targets.numel(), 1)
    head = output_head(model)
    with head_bypassed(head):  # the model's "logits" are the trained positions' hidden states
        outputs = model(**inputs)
    hidden = outputs.logits.reshape(-1, outputs.logits.shape[-1])
    outputs.logits = None  # no [trained, vocab] logits exist in this mode
    if liger:
        total = liger_linear_ce(hidden, head, targets)
    else:
        total = chunked_linear_ce(hidden, head, targets, chunk_tokens)
    return total / denom, outputs


def chunked_linear_ce(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """sum_i CE(head(hidden_i), target_i), `chunk` rows at a time, each chunk's logits recomputed in backward."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        sl = slice(start, start + chunk)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce, head, hidden[sl], targets[sl], use_reentrant=False)
        else:
            total = total + _chunk_ce(head, hidden[sl], targets[sl])
    return total


def _chunk_ce(head, hidden, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def liger_linear_ce(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Liger's fused linear cross entropy (summed) over the trained positions; needs CUDA (Triton)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"model.liger: the output head {type(head).__name__} exposes no weight to fuse; set "
                         "model.liger=false or use model.loss_chunk_tokens")
    bias = getattr(head, "bias", None)
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets, bias)


def output_head(model) -> torch.nn.Module:
    """The output projection module (through DDP/DeepSpeed/peft wrappers; peft's modules_to_save wrapper
    included, which calls the trained copy)."""
    inner = getattr(model, "module", model)
    return inner.get_output_embeddings()


def _passthrough(hidden, *args, **kwargs):
    return hidden


@contextlib.contextmanager
def head_bypassed(head: torch.nn.Module) -> Iterator[None]:
    """Within this block the head returns its input (its module hooks still run, e.g. ZeRO-3's gathers)."""
    head.forward = _passthrough
    try:
        yield
    finally:
        del head.forward  # back to the class's forward
