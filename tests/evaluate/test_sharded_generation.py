"""Distributed generation eval (the path ZeRO-3 uses): 2 CPU ranks over gloo each decode a shard with
synced_gpus=True (uneven shards, rows finishing at different steps); the gathered predictions equal
single-process decoding, in order. DeepSpeed itself is not started here (see README)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO, REPO

from llava_train.config.schema import DataConfig
from llava_train.data.dataset import ConversationDataset
from llava_train.evaluate.generate import generate_predictions

N = 7  # odd: rank 1 gets a shorter shard and repeats its last prompt


@pytest.mark.slow
def test_two_rank_sharded_generation_equals_single_process(trained_run, processor, encoder, tmp_path):
    out = tmp_path / "preds.json"
    worker = Path(__file__).with_name("sharded_generation_worker.py")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(trained_run.out), str(trained_run.eval_path),
                           str(DEMO), str(N), str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sharded = json.loads(out.read_text())
    ds = ConversationDataset(str(trained_run.eval_path), DataConfig(train_path=str(trained_run.eval_path),
                                                                    image_root=str(DEMO)), encoder,
                             processor.image_processor)
    single = generate_predictions(trained_run.model, ds, processor.tokenizer, batch_size=2, indices=range(N))
    assert [p["id"] for p in sharded] == [p.id for p in single]
    assert [p["prediction"] for p in sharded] == [p.prediction for p in single]
