"""Batch plans: length- and modality-grouped batches, token budgets, packing bins; distributed and resumable.

In LLaVA-NeXT one 640x480 image is ~2,340 tokens while a text-only sample may be 200, so random
batches pad away most of the compute. A *plan* is the list of batches (lists of sample indices) of one
epoch, built from the samples' total lengths (text + image tokens, known before any pixel is decoded):

1. the samples are shuffled with a generator seeded by (seed, epoch): the same seed and epoch give
   the same plan on every rank and after a restart;
2. with modality grouping, text-only and image samples go to separate pools (never mixed in a batch);
3. each pool is cut into *megabatches* of `megabatch` batches; with length grouping each megabatch is
   sorted by length, so neighbours have similar lengths (and, for images, similar patch counts);
4. batches are cut: `batch_size` samples, or as many as fit `max_tokens` padded tokens
   (batch size x longest), or, for packing, `batch_size` rows of at most `max_length` tokens each
   (first-fit decreasing; rows of similar fill share a batch; modalities may share a row);
5. the batch order is shuffled (the largest batch goes first, so an out-of-memory shows at step 1);
6. for `world_size` ranks the count is made a multiple of `world_size` by splitting the largest
   batches, never by repeating samples: batch k goes to rank k % world_size, so every sample is seen
   exactly once per epoch and every rank takes the same number of steps.

`PlanSampler` yields the global plan (accelerate's `BatchSamplerShard` then hands batch k to rank
k % world_size, which is the same split) or, given `rank`, only that rank's share. Mid-epoch resume is
HF Trainer's (accelerate's `skip_first_batches`): the plan only has to be the same for (seed, epoch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from llava_train.data.collate import Collator
from llava_train.data.packing import PackingCollator, pack_bins

MEGABATCH = 64
"""Batches per sorting window: large enough for near-zero padding, small enough to keep batches random."""


@dataclass(frozen=True)
class PlanSpec:
    """How to cut an epoch into batches (see the module docstring)."""

    batch_size: int
    group_by_length: bool = True
    group_by_modality: bool = True
    max_tokens: Optional[int] = None  # token budget per batch: batch size x longest (padded) sample
    pack_length: Optional[int] = None  # packing: rows of at most this many tokens, `batch_size` rows a batch
    megabatch: int = MEGABATCH
    world_size: int = 1


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch])


def _cut(pool: list[int], lengths: Sequence[int], spec: PlanSpec) -> list[list[int]]:
    """Batches from one pool (already shuffled), window by window."""
    if spec.pack_length:
        window = spec.batch_size * spec.megabatch * 4  # several samples per row
    elif spec.max_tokens:
        window = max(spec.batch_size, 1) * spec.megabatch
    else:
        window = spec.batch_size * spec.megabatch
    batches: list[list[int]] = []
    for start in range(0, len(pool), window):
        chunk = pool[start: start + window]
        if spec.group_by_length or spec.max_tokens or spec.pack_length:
            chunk = sorted(chunk, key=lambda i: -lengths[i])
        if spec.pack_length:
            rows = pack_bins(chunk, lengths, spec.pack_length)
            rows.sort(key=lambda r: -sum(lengths[i] for i in r))  # rows of similar fill share a batch
            for k in range(0, len(rows), spec.batch_size):
                batches.append([i for row in rows[k: k + spec.batch_size] for i in row])
        elif spec.max_tokens:
            batch: list[int] = []
            for i in chunk:  # longest first: the first sample of a batch sets its width
                width = max([lengths[j] for j in batch[:1]] + [lengths[i]])
                if batch and (len(batch) + 1) * width > spec.max_tokens:
                    batches.append(batch)
                    batch = []
                batch.append(i)
            if batch:
                batches.append(batch)
        else:
            batches.extend(chunk[k: k + spec.batch_size] for k in range(0, len(chunk), spec.batch_size))
    return batches


def _cost(batch: list[int], lengths: Sequence[int]) -> int:
    return len(batch) * max(lengths[i] for i in batch)


def plan_epoch(lengths: Sequence[int], has_image: Optional[Sequence[bool]], spec: PlanSpec, *, seed: int,
               epoch: int) -> list[list[int]]:
    """The global list of batches for one epoch; every index appears exactly once."""
    n = len(lengths)
    if n < spec.world_size:
        raise ValueError(f"{n} sample(s) cannot feed {spec.world_size} ranks; use more data or fewer ranks")
    rng = _rng(seed, epoch)
    order = rng.permutation(n).tolist()
    # Packed rows may mix text-only and image samples (each keeps its images); a batch plan never does.
    if spec.group_by_modality and has_image is not None and not spec.pack_length:
        pools = [[i for i in order if not has_image[i]], [i for i in order if has_image[i]]]
    else:
        pools = [order]
    batches = [b for pool in pools if pool for b in _cut(pool, lengths, spec)]
    # Equal step counts on every rank without repeating a sample: split the largest batches.
    while len(batches) % spec.world_size:
        k = max((j for j in range(len(batches)) if len(batches[j]) > 1), key=lambda j: _cost(batches[j], lengths))
        big = batches.pop(k)
        half = len(big) // 2
        batches[k:k] = [big[:half], big[half:]]
    perm = rng.permutation(len(batches)).tolist()
    batches = [batches[j] for j in perm]
    # The largest step first (per rank: the first world_size batches), so memory limits show at once.
    first = max(range(len(batches)), key=lambda j: _cost(batches[j], lengths))
    batches[0], batches[first] = batches[first], batches[0]
    return batches


class PlanSampler(torch.utils.data.Sampler):
    """A batch sampler over `plan_epoch`: `set_epoch` reshuffles.

    `batch_size` is None on purpose: accelerate then treats batches as variable-sized and shards
    whole batches (batch k to rank k % world_size), which is exactly the plan's split.
    """

    batch_size = None
    drop_last = False

    def __init__(self, lengths: Sequence[int], has_image: Optional[Sequence[bool]], spec: PlanSpec, *,
                 seed: int = 0, rank: Optional[int] = None):
        self.lengths = np.asarray(lengths, dtype=np.int64).tolist()
        self.has_image = None if has_image is None else [bool(x) for x in has_image]
        self.spec = spec
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self._plan: Optional[tuple[int, list[list[int]]]] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_plan(self) -> list[list[int]]:
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, plan_epoch(self.lengths, self.has_image, self.spec, seed=self.seed,
                                                 epoch=self.epoch))
        return self._plan[1]

    def batches(self) -> list[list[int]]:
        plan = self.global_plan()
        return plan if self.rank is None else plan[self.rank:: self.spec.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()

    def __len__(self) -> int:
        return len(self.batches())


def has_image_flags(dataset) -> Optional[list[bool]]:
    """Per sample: does it carry an image (False: text-only). None when the dataset cannot tell."""
    if hasattr(dataset, "has_image"):
        return list(dataset.has_image)
    if hasattr(dataset, "items"):
        return [bool(conv.images) for conv, _ in dataset.items]
    return None


def pad_multiple(cfg) -> int:
    """`data.pad_to_multiple_of`, or its default: 8 on a CUDA GPU (tensor-core tiles), 1 on CPU."""
    if cfg.pad_to_multiple_of is not None:
        return cfg.pad_to_multiple_of
    import torch

    return 8 if torch.cuda.is_available() else 1


def batching(cfg, dataset, pad_token_id: int, *, batch_size: int, world_size: int, seed: int):
    """(collator, batch sampler or None) for a `DataConfig`: the one place the batching keys are read."""
    multiple = pad_multiple(cfg)
    if cfg.packing:
        collator = PackingCollator(pad_token_id=pad_token_id, max_length=cfg.max_length, pad_to_multiple_of=multiple)
    else:
        collator = Collator(pad_token_id=pad_token_id, pad_to_multiple_of=multiple)
    if getattr(cfg, "streaming", False):
        return collator, None  # a stream groups inside its window (data/streaming.py)
    if not (cfg.packing or cfg.group_by_length or cfg.group_by_modality or cfg.max_tokens_per_batch):
        return collator, None  # HF Trainer's random sampler
    spec = PlanSpec(batch_size=batch_size, group_by_length=cfg.group_by_length,
                    group_by_modality=cfg.group_by_modality, max_tokens=cfg.max_tokens_per_batch,
                    pack_length=cfg.max_length if cfg.packing else None, megabatch=cfg.group_window,
                    world_size=world_size)
    flags = has_image_flags(dataset) if cfg.group_by_modality else None
    return collator, PlanSampler(dataset.lengths, flags, spec, seed=seed)


def num_workers(cfg, *, cpu_compute: bool = False) -> int:
    """`data.num_workers`, or when None: min(4, CPU cores available per local rank - the cores the training
    process computes on). Samples are built at fetch (tokenised, images decoded and preprocessed), so workers
    overlap that with the step. On a GPU the training process keeps one core (it launches kernels); training
    on the CPU (`cpu_compute`) it keeps torch's intra-op threads, which use every core by default: a worker
    there only takes cores from the step (benchmarks/train_throughput.py, 2 cores: one worker made a run
    1.5x slower than none), so auto is 0."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    keep = torch.get_num_threads() if cpu_compute else 1
    return max(0, min(4, per_rank - keep))


def batching_problems(cfg) -> list[str]:
    """Problems with the batching keys of a `DataConfig` (collected by train/validate.py)."""
    problems = []
    if cfg.packing and cfg.max_tokens_per_batch:
        problems.append("data.packing and data.max_tokens_per_batch exclude each other: packing fills rows of "
                        "data.max_length; set one of them")
    if cfg.max_tokens_per_batch is not None and cfg.max_tokens_per_batch < cfg.max_length:
        problems.append(f"data.max_tokens_per_batch={cfg.max_tokens_per_batch} is below data.max_length="
                        f"{cfg.max_length}: a long sample could not form a batch; raise it")
    if cfg.pad_to_multiple_of is not None and cfg.pad_to_multiple_of < 1:
        problems.append("data.pad_to_multiple_of must be >= 1")
    if cfg.group_window < 1:
        problems.append("data.group_window must be >= 1")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        problems.append("data.num_workers must be >= 0 (or null: auto)")
    if cfg.prefetch_factor is not None and (cfg.num_workers == 0 or cfg.prefetch_factor < 1):
        problems.append("data.prefetch_factor needs data.num_workers > 0 (or auto) and a value >= 1")
    if len(cfg.lazy_image_hw) != 2 or min(cfg.lazy_image_hw) < 1:
        problems.append(f"data.lazy_image_hw={list(cfg.lazy_image_hw)} must be [height, width] in pixels")
    return problems
