"""`llava preview` and `llava doctor` on the demo data, through the CLI entry point."""

import json

import pytest

from conftest import DEMO
from llava_train.cli import main


def _run(capsys, *args):
    main(list(args))
    return capsys.readouterr().out


def test_preview_marks_trained_spans_and_writes_jsonl(tmp_path, capsys):
    out_file = tmp_path / "preview.jsonl"
    out = _run(capsys, "preview", "preview.start=10", "preview.num_samples=2", f"preview.output={out_file}",
               f"hydra.run.dir={tmp_path / 'run'}")
    # not a TTY: [[...]] markers; image tokens collapsed; per-sample counts
    assert "=== sample 11  id=train-00011  tokens=84 (text 38, image 46, trained 8)  images=42x28 (h x w) ===" in out
    assert "<image x46>\nWhat colour is the shape? [/INST][[ red</s>]][INST] Answer again in a full sentence. " \
           "[/INST][[ The circle is red.</s>]]" in out
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["id"] for r in records] == ["train-00010", "train-00011"]
    for r in records:
        assert len(r["input_ids"]) == len(r["labels"])
        assert r["input_ids"].count(32000) == sum(r["num_image_tokens"])
        assert all(lab == -100 for tid, lab in zip(r["input_ids"], r["labels"]) if tid == 32000)
    assert records[1]["image_sizes"] == [[42, 28]] and records[1]["num_image_tokens"] == [46]


def test_preview_colour(tmp_path, capsys):
    out = _run(capsys, "preview", "preview.num_samples=1", "preview.color=always", f"hydra.run.dir={tmp_path}")
    assert "\x1b[1;32m yellow</s>\x1b[0m" in out and "[[" not in out


def test_doctor_on_demo(tmp_path, capsys):
    png = tmp_path / "doctor.png"
    out = _run(capsys, "doctor", "doctor.workers=2", f"doctor.plot={png}", f"hydra.run.dir={tmp_path}")
    assert "== train: 2000 sample(s)" in out and "== eval: 150 sample(s)" in out
    assert "errors: none" in out and "doctor: OK" in out
    assert "over data.max_length=512: 0" in out and "trained tokens per epoch:" in out
    assert "image tokens per image:" in out and "images per sample: 0: " in out
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_doctor_fails_on_bad_samples(tmp_path, capsys):
    rows = [json.loads(line) for line in [json.dumps(r) for r in json.loads((DEMO / "eval.json").read_text())[:5]]]
    rows[1]["image"] = "images/missing.png"
    rows[2]["conversations"][0]["from"] = "robot"
    rows[3]["conversations"] = rows[3]["conversations"][:1]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["doctor", f"data.train_path={path}", f"data.image_root={DEMO}", "data.eval_path=null",
              "data.max_length=60", f"hydra.run.dir={tmp_path}"])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "ERRORS: 4 sample(s) cannot be used" in out and "doctor: FAILED, 4 bad sample(s)" in out
    for kind, sid in [("missing_image", rows[1]["id"]), ("unknown_role", rows[2]["id"]),
                      ("empty_reply", rows[3]["id"]), ("malformed_json", "#5")]:
        assert any(line.strip().startswith(kind) and sid in line for line in out.splitlines()), (kind, out)
    assert "over data.max_length=60:" in out


def test_doctor_decode_catches_cut_pixels_and_bad_fields(tmp_path, capsys):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (10, 200, 10)).save(buf, format="JPEG")
    (tmp_path / "ok.jpg").write_bytes(buf.getvalue())
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # intact header
    turns = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "green"}]
    rows = [{"id": "ok", "image": "ok.jpg", "conversations": turns},
            {"id": "cut", "image": "cut.jpg", "conversations": turns},
            {"id": "five", "image": 5, "conversations": turns}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = ["doctor", f"data.train_path={path}", "data.eval_path=null", "doctor.workers=1",
            f"hydra.run.dir={tmp_path}"]
    with pytest.raises(SystemExit):  # header only (the fast default): the cut JPEG passes
        main(args)
    out = capsys.readouterr().out
    assert "ERRORS: 1 sample(s)" in out and "bad_image_ref" in out and "first ids: five" in out
    with pytest.raises(SystemExit):
        main(args + ["doctor.decode=true"])
    out = capsys.readouterr().out
    assert "ERRORS: 2 sample(s)" in out and "corrupt_image" in out and "first ids: cut" in out
