"""`llava train` end to end through the CLI; the saved adapter loads with plain transformers + peft."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import DEMO, REPO


def _llava(*args, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "llava_train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    evals = json.loads((DEMO / "eval.json").read_text())[:12]
    eval_path = out / "eval_small.json"
    eval_path.write_text(json.dumps(evals))
    stdout = _llava("train", f"output_dir={out}/job", f"data.train_path={DEMO / 'train.json'}",
                    f"data.eval_path={eval_path}", f"data.image_root={DEMO}", "trainer.max_steps=30",
                    "trainer.logging_steps=5", "model=tiny", "peft=lora", "trainer.disable_tqdm=true")
    return out / "job", stdout


def test_outputs_and_metrics(small_run):
    job, stdout = small_run
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["train_loss"] < metrics["first_train_loss"]
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_count"] == 12
    assert (job / "final" / "adapter_model.safetensors").exists()
    assert (job / "final" / "processor_config.json").exists()
    assert "base checkpoint:" in stdout and "eval accuracy" in stdout


def test_final_adapter_loads_with_plain_peft(small_run):
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    job, stdout = small_run
    adapter_cfg = json.loads((job / "final" / "adapter_config.json").read_text())
    base_dir = adapter_cfg["base_model_name_or_path"]
    assert f"base checkpoint: {base_dir}" in stdout  # the printed base is the one recorded
    base = LlavaNextForConditionalGeneration.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, str(job / "final")).eval()
    processor = AutoProcessor.from_pretrained(str(job / "final"))
    # the reloaded adapter reproduces the predictions the training run wrote
    preds = [json.loads(line) for line in (job / "predictions.jsonl").read_text().splitlines()]
    evals = {e["id"]: e for e in json.loads((job.parent / "eval_small.json").read_text())}
    from PIL import Image

    for p in preds[:4]:
        e = evals[p["id"]]
        prompt = f"[INST] <image>\n{p['question']} [/INST]"
        inputs = processor(images=[Image.open(DEMO / e["image"])], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        text = processor.tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip()
        assert text == p["prediction"]


@pytest.mark.slow
def test_demo_learns(tmp_path):
    """The README's demo job: held-out accuracy >= 90 % where chance is 1/6."""
    _llava("train", f"output_dir={tmp_path}/demo", "trainer.disable_tqdm=true")
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["eval_accuracy"] >= 0.9, metrics
    assert metrics["train_loss"] < 0.25 * metrics["first_train_loss"]
