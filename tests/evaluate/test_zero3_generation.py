"""Generation eval under DeepSpeed ZeRO-3 (the in-training eval's path): 2 CPU ranks, weights
partitioned, each rank decodes its shard (uneven: 7 prompts) with synced_gpus; the gathered predictions
equal single-process decoding of the same model, in order."""

import copy
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

N = 7  # odd: rank 1's shard is shorter and repeats its last prompt


@pytest.mark.slow
def test_zero3_sharded_generation_equals_single_process(trained_run, processor, encoder, tmp_path):
    # the 16-step model may end every reply at once, which would make the comparison empty: no end-of-sequence
    # (written into the merged model's generation_config.json, and set on the single-process model below)
    no_eos = {"eos_token_id": processor.tokenizer.unk_token_id, "suppress_tokens": [processor.tokenizer.eos_token_id]}
    merged = copy.deepcopy(trained_run.model).merge_and_unload()
    merged.generation_config.update(**no_eos)
    merged.save_pretrained(str(tmp_path / "merged"))
    processor.save_pretrained(str(tmp_path / "merged"))
    out = tmp_path / "preds.json"
    worker = Path(__file__).with_name("zero3_generation_worker.py")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(tmp_path / "merged"), str(trained_run.eval_path), str(DEMO), str(N),
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["partitioned"]  # every rank held only its shard of the weights
    ds = ConversationDataset(str(trained_run.eval_path), DataConfig(train_path=str(trained_run.eval_path),
                                                                    image_root=str(DEMO)), encoder,
                             processor.image_processor)
    config = trained_run.model.generation_config
    saved = {k: getattr(config, k) for k in no_eos}
    config.update(**no_eos)
    try:
        single = generate_predictions(trained_run.model, ds, processor.tokenizer, batch_size=2, indices=range(N))
    finally:
        config.update(**saved)
    assert [p["id"] for p in result["predictions"]] == [p.id for p in single]
    assert [p["prediction"] for p in result["predictions"]] == [p.prediction for p in single]
    assert all(p.prediction for p in single)
