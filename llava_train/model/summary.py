"""The start-of-run summary: trainable parameters per module group, dtypes, quantised linears, checkpointing."""

from __future__ import annotations

from collections import OrderedDict

import torch

from llava_train.model.quantize import is_quantized_linear
from llava_train.model.targets import module_group


def _numel(p: torch.Tensor) -> int:
    """Logical element count (bitsandbytes packs two 4-bit weights per byte)."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return p.numel()


def trainable_summary(model) -> "OrderedDict[str, tuple[int, int]]":
    """{group: (trainable, total)} parameter counts."""
    out: OrderedDict[str, list[int]] = OrderedDict()
    for name, p in model.named_parameters():
        t = out.setdefault(module_group(name), [0, 0])
        t[1] += _numel(p)
        if p.requires_grad:
            t[0] += _numel(p)
    return OrderedDict((k, (v[0], v[1])) for k, v in out.items())


def quantized_modules(model) -> "OrderedDict[tuple[str, str], int]":
    """{(module group, '4bit'|'8bit'): count} of bitsandbytes linears."""
    out: OrderedDict[tuple[str, str], int] = OrderedDict()
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        return out
    for name, module in model.named_modules():
        kind = is_quantized_linear(module)
        if kind:
            key = (module_group(name), kind)
            out[key] = out.get(key, 0) + 1
    return out


def describe(model, *, attn_implementation: str = "", reentrant: bool | None = None) -> str:
    """Start-of-run summary: trainable parameters per group, dtypes, quantised modules, checkpointing."""
    lines = ["trainable parameters:"]
    total_trainable = total = 0
    for group, (trainable, count) in trainable_summary(model).items():
        lines.append(f"  {group:<15} {trainable:>14,} / {count:>14,}")
        total_trainable += trainable
        total += count
    lines.append(f"  {'total':<15} {total_trainable:>14,} / {total:>14,} ({total_trainable / max(total, 1):.2%})")
    dtypes: dict[str, set[str]] = OrderedDict()
    for name, p in model.named_parameters():
        dtypes.setdefault(module_group(name), set()).add(str(p.dtype).removeprefix("torch."))
    lines.append("dtypes: " + ", ".join(f"{g}={'/'.join(sorted(d))}" for g, d in dtypes.items()))
    quantized = quantized_modules(model)
    if quantized:
        lines.append("quantised: " + ", ".join(f"{g}: {n} x {kind}" for (g, kind), n in quantized.items()))
    else:
        lines.append("quantised: none")
    if attn_implementation:
        lines.append(f"attention: {attn_implementation}")
    if getattr(model, "is_activation_checkpointing", False):
        lines.append(f"gradient checkpointing: on ({'reentrant' if reentrant else 'non-reentrant'})")
    return "\n".join(lines)
