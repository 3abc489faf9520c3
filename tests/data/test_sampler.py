"""Batch plans: deterministic per (seed, epoch), resumable mid-epoch, every sample once per epoch on any
number of ranks, modality never mixed, token budgets kept."""

import random
from collections import Counter

import pytest
from accelerate.data_loader import BatchSamplerShard

from llava_train.data.sampler import PlanSampler, PlanSpec, plan_epoch


def _data(n=1000, seed=0):
    rnd = random.Random(seed)
    has_image = [rnd.random() > 0.06 for _ in range(n)]
    lengths = [rnd.choice([2340, 2100, 1800, 1176]) + rnd.randint(20, 600) if img else rnd.randint(30, 900)
               for img in has_image]
    return lengths, has_image


SPECS = [
    PlanSpec(batch_size=8),
    PlanSpec(batch_size=8, group_by_length=False, group_by_modality=False),
    PlanSpec(batch_size=4, max_tokens=12_000),
    PlanSpec(batch_size=2, pack_length=4096),
]


def _flat(batches):
    return [i for b in batches for i in b]


@pytest.mark.parametrize("spec", SPECS, ids=["grouped", "random", "budget", "packing"])
def test_every_sample_once_and_deterministic(spec):
    lengths, has_image = _data()
    a = plan_epoch(lengths, has_image, spec, seed=3, epoch=0)
    assert sorted(_flat(a)) == list(range(len(lengths)))
    assert plan_epoch(lengths, has_image, spec, seed=3, epoch=0) == a
    b = plan_epoch(lengths, has_image, spec, seed=3, epoch=1)
    assert sorted(_flat(b)) == list(range(len(lengths))) and b != a
    assert plan_epoch(lengths, has_image, spec, seed=4, epoch=0) != a


def test_modality_never_mixed_and_padding_small():
    lengths, has_image = _data()
    spec = PlanSpec(batch_size=8)
    batches = plan_epoch(lengths, has_image, spec, seed=0, epoch=0)
    assert all(len({has_image[i] for i in b}) == 1 for b in batches)

    def real_share(bs):
        return sum(lengths[i] for b in bs for i in b) / sum(len(b) * max(lengths[i] for i in b) for b in bs)

    randomly = plan_epoch(lengths, has_image, PlanSpec(batch_size=8, group_by_length=False,
                                                       group_by_modality=False), seed=0, epoch=0)
    assert real_share(batches) > 0.97 > real_share(randomly)


def test_token_budget_kept():
    lengths, has_image = _data()
    budget = 12_000
    batches = plan_epoch(lengths, has_image, PlanSpec(batch_size=4, max_tokens=budget), seed=0, epoch=0)
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget
    # short text-only samples get big batches, long image samples small ones
    assert max(len(b) for b in batches) > 10 and min(len(b) for b in batches) <= 5


def test_resume_mid_epoch():
    """Resume is HF Trainer's: accelerate's `skip_first_batches` over a fresh sampler with the same seed and
    epoch continues exactly where the interrupted one stopped."""
    from accelerate import skip_first_batches
    from torch.utils.data import DataLoader

    lengths, has_image = _data()
    spec = PlanSpec(batch_size=8, max_tokens=20_000)

    def loader():
        s = PlanSampler(lengths, has_image, spec, seed=7)  # a fresh process after a restart
        s.set_epoch(2)
        return DataLoader(list(range(len(lengths))), batch_sampler=s, collate_fn=list)

    it = iter(loader())
    seen = [next(it) for _ in range(5)]
    rest = list(skip_first_batches(loader(), 5))
    assert seen + rest == list(loader()) and len(rest) == len(loader()) - 5


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("spec", SPECS[::2] + SPECS[3:], ids=["grouped", "budget", "packing"])
def test_distributed_shards_cover_every_sample_once(world, spec):
    lengths, has_image = _data(n=997)
    spec = PlanSpec(**{**spec.__dict__, "world_size": world})
    for epoch in range(2):
        shares = []
        for rank in range(world):
            s = PlanSampler(lengths, has_image, spec, seed=1, rank=rank)
            s.set_epoch(epoch)
            shares.append(list(s))
        assert len({len(sh) for sh in shares}) == 1  # same number of steps on every rank
        counts = Counter(i for sh in shares for b in sh for i in b)
        assert sorted(counts) == list(range(len(lengths))) and set(counts.values()) == {1}
        # accelerate's shard of the global plan (what HF Trainer does) is the same split
        for rank in range(world):
            g = PlanSampler(lengths, has_image, spec, seed=1)
            g.set_epoch(epoch)
            assert list(BatchSamplerShard(g, num_processes=world, process_index=rank)) == shares[rank]


def test_too_few_samples_for_ranks():
    with pytest.raises(ValueError, match="cannot feed 4 ranks"):
        plan_epoch([10, 20, 30], None, PlanSpec(batch_size=2, world_size=4), seed=0, epoch=0)


def test_bad_batching_settings_listed_together():
    from llava_train.config import DataConfig
    from llava_train.data.sampler import batching_problems

    cfg = DataConfig(train_path="x", max_length=4096, packing=True, max_tokens_per_batch=1000, pad_to_multiple_of=0,
                     prefetch_factor=2, num_workers=0)
    problems = batching_problems(cfg)
    assert len(problems) == 4, problems
    assert batching_problems(DataConfig(train_path="x")) == []


def test_num_workers_auto_leaves_a_core_per_rank(monkeypatch):
    from llava_train.config import DataConfig
    from llava_train.data.sampler import num_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert num_workers(DataConfig()) == 1  # 2 cores per rank
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert num_workers(DataConfig()) == 4  # capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert num_workers(DataConfig()) == 0  # a core per rank: fetch in-process
    assert num_workers(DataConfig(num_workers=3)) == 3


def test_num_workers_auto_training_on_the_cpu_leaves_the_compute_threads_their_cores(monkeypatch):
    import torch

    from llava_train.config import DataConfig
    from llava_train.data.sampler import num_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)  # torch's default: every core
    assert num_workers(DataConfig(), cpu_compute=True) == 0
    monkeypatch.setattr(torch, "get_num_threads", lambda: 12)
    assert num_workers(DataConfig(), cpu_compute=True) == 4
    monkeypatch.setattr(torch, "get_num_threads", lambda: 14)
    assert num_workers(DataConfig(), cpu_compute=True) == 2
    assert num_workers(DataConfig(num_workers=3), cpu_compute=True) == 3


def test_training_arguments_pick_the_cpu_count_on_this_machine(tmp_path):
    """No GPU here: the run's workers are what the CPU rule gives (0 with torch's default threads)."""
    import torch

    from llava_train.config import DataConfig, TrainJobConfig
    from llava_train.data.sampler import num_workers
    from llava_train.train.recipe import training_arguments

    if torch.cuda.is_available():
        pytest.skip("the CPU rule applies where training computes on the CPU")
    args = training_arguments(TrainJobConfig(), tmp_path)
    assert args.dataloader_num_workers == num_workers(DataConfig(), cpu_compute=True)
    assert args.dataloader_persistent_workers == (args.dataloader_num_workers > 0)
