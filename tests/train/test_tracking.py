"""Tracking of the shared training run: wandb offline run (config, metrics, predictions table with
images), the plain JSONL log, the PNG curves next to each checkpoint and in the output folder."""

import json
import struct

from PIL import Image

from llava_train.train.callbacks import PLOT_FILE

BLOCK = 32768  # wandb's transaction log (.wandb): a LevelDB-style log of protobuf records


def _wandb_records(path):
    """Records of a .wandb file (header ':W&B' + magic + version, then 32 KiB blocks of
    [crc32, length, type] + payload; types full=1, first=2, middle=3, last=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            buf = chunk
        else:
            buf += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def test_wandb_offline_run_has_config_metrics_and_predictions_table(trained_run):
    runs = list((trained_run.out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = list(_wandb_records(next(runs[0].glob("run-*.wandb"))))
    kinds = [r.WhichOneof("record_type") for r in records]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == "run" and run.project == "llava-train" and list(run.tags) == ["test"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["peft"]["method"] == "lora" and config["trainer"]["max_steps"] == 16
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(item.value_json)
    # metrics logged by HF's WandbCallback (report_to=wandb) into the run started by Tracking
    assert len(history["train/loss"]) == 4 and len(history["eval/loss"]) == 2 and len(history["eval/accuracy"]) == 2
    assert "train/samples_per_second" in history  # throughput: ours, on top of HF's
    summary_keys = {i.key or "/".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "summary"
                    for i in r.summary.update}
    assert "final/eval_accuracy" in summary_keys
    tables = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"
              and r.artifact.type == "run_table"]
    # artifact names are "run-<run id>-<table key>" (wandb may append a suffix): match the keys
    names = [t.name for t in tables]
    assert any("evalpredictions" in n for n in names), names
    assert any("finalpredictions" in n for n in names), names
    entries = [e.path for e in tables[0].manifest.contents]
    assert any(p.endswith(".table.json") for p in entries)
    assert sum(p.startswith("media/images/") and p.endswith(".png") for p in entries) >= 1
    # one table per in-training eval (file names carry wandb's own step); the step column is the trainer's
    evals = [json.loads(p.read_text()) for p in runs[0].glob("files/media/table/eval/predictions_*.table.json")]
    assert sorted(t["data"][0][0] for t in evals) == [8, 16]
    table = evals[0]
    assert table["columns"] == ["step", "id", "image", "question", "reference", "prediction", "exact"]
    assert len(table["data"]) == 4 and "exit" in kinds


def test_jsonl_log_and_metrics_keys(trained_run):
    rows = [json.loads(line) for line in (trained_run.out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [4, 8, 12, 16]
    assert [r["step"] for r in rows if "eval_accuracy" in r and not r.get("final")] == [8, 16]
    assert [r["step"] for r in rows if "eval_loss" in r] == [8, 16]
    assert all(r["samples_per_second"] > 0 for r in rows if "loss" in r)
    assert rows[-1]["final"] and rows[-1]["eval_accuracy"] == trained_run.results["eval_accuracy"]
    metrics = json.loads((trained_run.out / "metrics.json").read_text())
    assert {"train_loss", "eval_accuracy"} <= set(metrics)
    assert (trained_run.out / "config.yaml").read_text().startswith("model:")


def test_png_curves_exist_and_are_images(trained_run):
    for path in (trained_run.out / PLOT_FILE, trained_run.out / "checkpoint-8" / PLOT_FILE,
                 trained_run.out / "checkpoint-16" / PLOT_FILE):
        assert path.stat().st_size > 5000, path
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 100
            # not blank: many distinct colours (curves, axes, text)
            assert len(im.convert("RGB").getcolors(maxcolors=100000) or []) > 20


def test_run_name_comes_from_the_hydra_job(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from llava_train.cli import CONFIG_DIR
    from llava_train.config.schema import LoggerConfig
    from llava_train.train.callbacks import run_name

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"output_dir={tmp_path}/14-03-12"], return_hydra_config=True)
    cfg.hydra.runtime.output_dir = f"{tmp_path}/14-03-12"
    HydraConfig.instance().set_config(cfg)
    try:
        assert run_name(LoggerConfig(), tmp_path) == "train/14-03-12"
        assert run_name(LoggerConfig(name="mine"), tmp_path) == "mine"
    finally:
        HydraConfig.instance().cfg = None
    assert run_name(LoggerConfig(), tmp_path / "out") == "out"
