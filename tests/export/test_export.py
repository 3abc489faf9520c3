"""`llava export` round trip: the adapter (plain transformers + peft) and the merged model (plain
transformers) reproduce the model as it was at the end of training; the merged model runs through
`transformers.pipeline`; the model card parses; the hub token never reaches a file or a log."""

import json
import logging

import pytest
import torch

from conftest import DEMO
from llava_train.config.jobs import ExportConfig
from llava_train.config.schema import DataConfig
from llava_train.data.collate import Collator
from llava_train.data.dataset import ConversationDataset
from llava_train.evaluate.generate import generate_predictions

SENTINEL = "hf_SENTINELtokenVALUE0123456789"
# fp32 throughout. The adapter path computes exactly what training computed; merging folds
# B@A*scale into the base weights, which reorders float sums: logits agree to 1e-4.
ADAPTER_ATOL = 1e-5
MERGED_ATOL = 1e-4


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory, caplog_module):
    """Export adapter + merged (2 MB shards) and push with the upload function replaced by a recorder."""
    from llava_train.export import hub
    from llava_train.export.run import run

    calls = []
    out = tmp_path_factory.mktemp("export")
    cfg = ExportConfig(source=str(trained_run.out), dtype="fp32", max_shard_size="2MB", push_to_hub=True,
                       repo_id="someone/tiny-llava-demo", private=True, push="merged", datasets=["someone/demo-shapes"],
                       license="apache-2.0")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", SENTINEL)
        mp.setattr(hub, "upload", lambda folder, repo_id, private, token: calls.append(
            (folder, repo_id, private, token)) or "https://huggingface.co/someone/tiny-llava-demo/commit/0")
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            result = run(cfg, str(out))
    return out, result, calls, buf.getvalue()


@pytest.fixture(scope="module")
def caplog_module():
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep(level=logging.DEBUG)
    logging.getLogger().addHandler(handler)
    yield records
    logging.getLogger().removeHandler(handler)


def _eval_batch(trained_run, processor, encoder, n=6):
    ds = ConversationDataset(str(trained_run.eval_path), DataConfig(train_path=str(trained_run.eval_path),
                                                                    image_root=str(DEMO)), encoder,
                             processor.image_processor)
    return ds, Collator(pad_token_id=processor.tokenizer.pad_token_id)([ds[i] for i in range(n)])


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _train_predictions(trained_run):
    return [json.loads(line) for line in (trained_run.out / "predictions.jsonl").read_text().splitlines()]


def test_adapter_round_trip(trained_run, exported, processor, encoder):
    from peft import PeftModel
    from transformers import LlavaNextForConditionalGeneration

    out, _, _, _ = exported
    adapter = out / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "training_config.yaml",
            "README.md"} <= {p.name for p in adapter.iterdir()}
    base_dir = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(LlavaNextForConditionalGeneration.from_pretrained(base_dir), str(adapter)).eval()
    ds, batch = _eval_batch(trained_run, processor, encoder)
    torch.testing.assert_close(_logits(model, batch), _logits(trained_run.model, batch), atol=ADAPTER_ATOL, rtol=0)
    preds = generate_predictions(model, ds, processor.tokenizer, batch_size=8)
    assert [p.prediction for p in preds] == [p["prediction"] for p in _train_predictions(trained_run)]


def test_merged_round_trip_plain_transformers(trained_run, exported, processor, encoder):
    from transformers import LlavaNextForConditionalGeneration

    out, _, _, _ = exported
    merged = out / "merged"
    shards = sorted(merged.glob("model-*.safetensors"))
    assert len(shards) > 1 and (merged / "model.safetensors.index.json").exists()
    assert not list(merged.glob("adapter_*"))
    model = LlavaNextForConditionalGeneration.from_pretrained(str(merged)).eval()
    assert model.dtype == torch.float32
    ds, batch = _eval_batch(trained_run, processor, encoder)
    ref = _logits(trained_run.model, batch)
    base = LlavaNextForConditionalGeneration.from_pretrained(
        json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]).eval()
    assert (_logits(base, batch) - ref).abs().max() > 1.0  # training changed the model: the check can fail
    torch.testing.assert_close(_logits(model, batch), ref, atol=MERGED_ATOL, rtol=MERGED_ATOL)
    preds = generate_predictions(model, ds, processor.tokenizer, batch_size=8)
    assert [p.prediction for p in preds] == [p["prediction"] for p in _train_predictions(trained_run)]


def test_merged_runs_in_pipeline(trained_run, exported):
    from PIL import Image
    from transformers import pipeline

    out, _, _, _ = exported
    pipe = pipeline("image-text-to-text", model=str(out / "merged"), device="cpu")
    evals = {e["id"]: e for e in json.loads(trained_run.eval_path.read_text())}
    for p in _train_predictions(trained_run)[:3]:
        image = Image.open(DEMO / evals[p["id"]]["image"]).convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": p["question"]}]}]
        got = pipe(text=messages, max_new_tokens=16, do_sample=False, return_full_text=False)
        assert got[0]["generated_text"].strip() == p["prediction"]


def test_model_card_parses_and_holds_fields(exported):
    from huggingface_hub import ModelCard

    out, _, _, _ = exported
    merged = ModelCard.load(out / "merged" / "README.md")
    adapter = ModelCard.load(out / "adapter" / "README.md")
    for card, library in ((merged, "transformers"), (adapter, "peft")):
        d = card.data
        assert d.library_name == library
        assert d.pipeline_tag == "image-text-to-text"
        assert d.base_model and d.datasets == ["someone/demo-shapes"] and d.license == "apache-2.0"
        assert {r.metric_type for r in d.eval_results} == {"exact_match", "contains_match"}
        assert "## Training hyperparameters" in card.text and "| LoRA r | `16` |" in card.text
        assert "## Usage" in card.text and "eval_accuracy" in card.text
    assert 'pipeline("image-text-to-text", model="someone/tiny-llava-demo")' in merged.text
    assert "PeftModel.from_pretrained" in adapter.text


def test_push_uses_token_but_never_writes_it(trained_run, exported, caplog_module):
    out, result, calls, printed = exported
    assert len(calls) == 1
    folder, repo_id, private, token = calls[0]
    assert (folder, repo_id, private, token) == (out / "merged", "someone/tiny-llava-demo", True, SENTINEL)
    assert result["push"]["url"].startswith("https://huggingface.co/")
    assert "uploading" in printed and "token from HF_TOKEN" in printed
    texts = [printed, *caplog_module]
    for root in (out, trained_run.out):
        texts += [p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file()]
    assert len(texts) > 20
    assert not [t for t in texts if SENTINEL in t]


def test_dry_run_lists_upload_without_token(trained_run, tmp_path, monkeypatch, capsys):
    from llava_train.export import hub
    from llava_train.export.run import run

    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    monkeypatch.setattr(hub, "upload", lambda *a: pytest.fail("dry_run must not upload"))
    result = run(ExportConfig(source=str(trained_run.out), merged=False, push="adapter", push_to_hub=True,
                              repo_id="someone/tiny-adapter", dry_run=True), str(tmp_path))
    printed = "".join(capsys.readouterr())
    assert result["push"]["dry_run"] and "adapter_model.safetensors" in result["push"]["files"]
    assert "would upload" in printed and "adapter_model.safetensors" in printed
    assert "library_name: peft" in printed  # the model card is shown
    written = [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()]
    assert SENTINEL not in printed and not [t for t in written if SENTINEL in t]


def test_llava_eval_on_merged_and_base(trained_run, exported, tmp_path):
    from llava_train.config.jobs import EvalDataConfig, EvalJobConfig
    from llava_train.config.schema import ModelConfig
    from llava_train.evaluate.run import run

    out, _, _, _ = exported
    data = EvalDataConfig(path=str(trained_run.eval_path), image_root=str(DEMO))
    merged = run(EvalJobConfig(model=ModelConfig(path=str(out / "merged")), data=data), str(tmp_path / "merged"))
    assert not merged["adapter"] and merged["exact_match"] == trained_run.results["eval_accuracy"]
    base = run(EvalJobConfig(model=ModelConfig(path="tiny"), data=EvalDataConfig(
        path=str(trained_run.eval_path), image_root=str(DEMO), max_samples=4)), str(tmp_path / "base"))
    assert base["count"] == 4 and not base["adapter"]
    assert (tmp_path / "base" / "predictions.jsonl").read_text().count("\n") == 4
