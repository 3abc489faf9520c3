"""`llava eval` reproduces training's accuracy; batched (left-padded) generation equals one-by-one;
`llava chat` one-shot, batch and interactive."""

import io
import json
import re
import subprocess
import sys

from conftest import DEMO, REPO
from llava_train.config.jobs import ChatJobConfig
from llava_train.config.schema import DataConfig, ModelConfig
from llava_train.data.dataset import ConversationDataset
from llava_train.evaluate.generate import generate_predictions

ACC = re.compile(r"eval accuracy \(exact match\): ([\d.]+)% on (\d+) samples")


def _llava(*args):
    proc = subprocess.run([sys.executable, "-m", "llava_train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _train_predictions(trained_run):
    return [json.loads(line) for line in (trained_run.out / "predictions.jsonl").read_text().splitlines()]


def test_llava_eval_reproduces_training_accuracy(trained_run, tmp_path):
    trained = ACC.search(trained_run.stdout)
    assert trained, trained_run.stdout[-2000:]
    stdout = _llava("eval", f"model.path={trained_run.out}", f"data.path={trained_run.eval_path}",
                    f"data.image_root={DEMO}", f"output_dir={tmp_path}")
    got = ACC.search(stdout)
    assert got and got.groups() == trained.groups(), stdout[-2000:]
    assert "adapter" in stdout  # resolved from adapter_config.json, not from the folder name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["exact_match"] == trained_run.results["eval_accuracy"]
    assert metrics["count"] == 32 and set(metrics["per_question_type"]) == {"colour"}
    assert 0.0 <= metrics["contains_match"] <= 1.0
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert set(preds[0]) >= {"id", "question", "reference", "prediction"}
    assert [p["prediction"] for p in preds] == [p["prediction"] for p in _train_predictions(trained_run)]


def test_batched_generation_equals_one_by_one(trained_run, processor, encoder):
    ds = ConversationDataset(str(trained_run.eval_path), DataConfig(train_path=str(trained_run.eval_path),
                                                                    image_root=str(DEMO)), encoder,
                             processor.image_processor)
    idx = list(range(8))
    lengths = {ds.lengths[i] for i in idx}
    assert len(lengths) > 1  # prompts of different lengths: the batch really is left padded
    # the 16-step model may end every reply at once, which would make the comparison empty: no end-of-sequence
    config = trained_run.model.generation_config
    eos, suppress = config.eos_token_id, config.suppress_tokens
    config.eos_token_id, config.suppress_tokens = processor.tokenizer.unk_token_id, [processor.tokenizer.eos_token_id]
    try:
        batched = generate_predictions(trained_run.model, ds, processor.tokenizer, batch_size=8, indices=idx)
        single = generate_predictions(trained_run.model, ds, processor.tokenizer, batch_size=1, indices=idx)
    finally:
        config.eos_token_id, config.suppress_tokens = eos, suppress
    assert [p.prediction for p in batched] == [p.prediction for p in single]
    assert all(p.prediction for p in batched)


def test_chat_one_shot(trained_run, capsys):
    from llava_train.evaluate.chat import run

    pred = _train_predictions(trained_run)[0]
    image = DEMO / json.loads(trained_run.eval_path.read_text())[0]["image"]
    run(ChatJobConfig(model=ModelConfig(path=str(trained_run.out)), images=[str(image)], prompt=pred["question"],
                      max_new_tokens=16))
    lines = capsys.readouterr().out.splitlines()
    assert lines and lines[-1].strip() == pred["prediction"]  # the reply is the last line (may be empty)


def test_chat_batch_and_interactive(trained_run, tmp_path):
    from llava_train.evaluate.chat import Chat, interactive, run_batch

    evals = json.loads(trained_run.eval_path.read_text())
    preds = _train_predictions(trained_run)
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"id": e["id"], "prompt": p["question"], "images": [str(DEMO / e["image"])]})
                                + "\n" for e, p in zip(evals[:5], preds[:5])))
    chat = Chat(ChatJobConfig(model=ModelConfig(path=str(trained_run.out)), max_new_tokens=16, batch_size=3))
    dest = run_batch(chat, str(requests), "")
    replies = [json.loads(line) for line in dest.read_text().splitlines()]
    assert [r["id"] for r in replies] == [e["id"] for e in evals[:5]]
    assert [r["reply"] for r in replies] == [p["prediction"] for p in preds[:5]]

    out = io.StringIO()
    stdin = io.StringIO(f"/image {DEMO / evals[1]['image']}\n{preds[1]['question']}\nAnd now?\n/quit\nignored\n")
    interactive(chat, stdin, out, [])
    answers = [line[len("assistant: "):] for line in out.getvalue().splitlines() if line.startswith("assistant: ")]
    assert len(answers) == 2 and answers[0] == preds[1]["prediction"]
