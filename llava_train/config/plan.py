"""The `plan` slice of `llava train` / `llava plan`: the memory pre-flight's inputs (llava_train/train/plan.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class PlanConfig:
    """`llava plan`, and the fit check `llava train` runs on a CUDA machine (llava_train/train/plan.py)."""

    # Memory per GPU in GiB (an "80GB" GPU holds 80 GiB). None: the visible GPU's, else 80.
    # `llava train`'s fit check on CUDA always uses the visible GPU and the launch's world size.
    gpu_memory_gb: Optional[float] = None
    # GPUs the run spreads over. None: $WORLD_SIZE, else the visible GPUs, else 1.
    world_size: Optional[int] = None
    # Text tokens per sample beside the checkpoint's largest image (when the data are not scanned).
    text_tokens: int = 512
    # Read the training data as `llava doctor` does: sample count, longest sample and trained tokens.
    scan_data: bool = False
    # Training samples per epoch when the data are not scanned (steps per epoch). None: unknown.
    num_samples: Optional[int] = None
    # Measured real tokens per second per GPU (e.g. from log.jsonl): wall time per epoch. None: not shown.
    tokens_per_second: Optional[float] = None
    # Fraction added to the total for allocator fragmentation and transient buffers.
    headroom: float = 0.1
    # GiB per GPU for the CUDA context, cuBLAS/NCCL workspaces.
    overhead_gb: float = 1.5
    # `llava train` on CUDA refuses up front when the plan's total exceeds the GPU memory.
    check: bool = True
