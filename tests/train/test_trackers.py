"""`logger=tensorboard|mlflow`: HF Trainer's own integrations (report_to) write their files; the curves PNG and
log.jsonl stay on top of them."""

import json
import struct

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import DEMO
from llava_train.cli import CONFIG_DIR


def _run(tmp_path, logger, monkeypatch):
    from llava_train.train.recipe import run

    train = tmp_path / "train32.json"
    train.write_text(json.dumps(json.loads((DEMO / "train.json").read_text())[:32]))
    out = tmp_path / "run"
    overrides = [f"logger={logger}", f"output_dir={out}", f"data.train_path={train}", "data.eval_path=null",
                 f"data.image_root={DEMO}", "trainer.max_steps=3", "trainer.logging_steps=1",
                 "trainer.per_device_train_batch_size=4", "trainer.disable_tqdm=true", "logger.project=trackers"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="train", overrides=overrides))
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    results = run(cfg, str(out))
    assert (out / "training_curves.png").stat().st_size > 5000  # our callback on top of HF's logging
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)] == [1, 2, 3]
    return out, results


def _tfrecords(path):
    """Payloads of a TFRecord file (uint64 length, uint32 crc, data, uint32 crc)."""
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos: pos + 8])
        yield data[pos + 12: pos + 12 + length]
        pos += 12 + length + 4


@pytest.mark.slow
def test_tensorboard_run_writes_event_files(tmp_path, monkeypatch, tiny_dir):
    from tensorboardX.proto.event_pb2 import Event

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out, results = _run(tmp_path, "tensorboard", monkeypatch)
    files = list((out / "runs").glob("*/events.out.tfevents.*"))
    assert len(files) == 1, files
    losses = {}
    for payload in _tfrecords(files[0]):
        event = Event.FromString(payload)
        for v in event.summary.value:
            if v.tag == "train/loss":
                losses[event.step] = v.simple_value
    assert sorted(losses) == [1, 2, 3]
    assert losses[3] == pytest.approx(results["loss_history"][-1][1], rel=1e-5)


@pytest.mark.slow
def test_mlflow_run_writes_a_local_file_store(tmp_path, monkeypatch, tiny_dir):
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{store}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.7 refuses file stores without it
    out, results = _run(tmp_path, "mlflow", monkeypatch)
    experiments = [p.parent for p in store.glob("*/meta.yaml") if "name: trackers" in p.read_text()]
    assert len(experiments) == 1, list(store.iterdir())
    runs = [p.parent for p in experiments[0].glob("*/meta.yaml")]
    assert len(runs) == 1
    loss_file = runs[0] / "metrics" / "loss"
    steps = [int(line.split()[2]) for line in loss_file.read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert float(loss_file.read_text().splitlines()[-1].split()[1]) == pytest.approx(
        results["loss_history"][-1][1], rel=1e-5)
    assert (runs[0] / "params" / "learning_rate").read_text() == "0.002"  # model=tiny's optim.lr
