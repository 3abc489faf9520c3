"""benchmarks/train_throughput.py runs its llava-train rows end to end (TRL's rows need the `bench` extra):
every row trains, counts the same real and trained tokens (also when DataLoader workers collate), and times its
data wait. After a merge changed the
loss hook, the benchmark once counted 0 tokens and its full-head row failed: this catches that."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from llava_train.config import DataConfig
from llava_train.data.sampler import num_workers

pytestmark = pytest.mark.slow


def test_llava_rows_train_and_count_tokens(tmp_path):
    out = tmp_path / "tp.json"
    rows = ("llava_default,llava_assumed_image_sizes,llava_full_head,llava_padding_mask,llava_processor_pixels,"
            "llava_one_fetch_thread,llava_packing,llava_default_workers")
    proc = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--samples", "8", "--repeats", "1",
                           "--only", rows, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == set(rows.split(","))
    for name, r in results.items():
        assert "error" not in r, (name, r.get("error"), r.get("traceback"))
        assert r["real_tokens"] > 0 and r["trained_tokens"] > 0 and 0 < r["median_data_wait_s"] < r["median_wall_s"]
        assert r["padded_tokens"] >= r["real_tokens"] and r["real_share"] == round(r["real_tokens"] /
                                                                                    r["padded_tokens"], 4)
    assert results["llava_default_workers"]["dataloader_workers"] == 1  # the counts travel from a worker too
    assert results["llava_default"]["dataloader_workers"] == num_workers(DataConfig(),
                                                                         cpu_compute=not torch.cuda.is_available())
    assert len({r["real_tokens"] for r in results.values()}) == 1  # the same samples, whatever the batching
    assert len({r["trained_tokens"] for r in results.values()}) == 1
