"""Run identity: which run an output folder and a checkpoint belong to, and who may write there.

A run has an id (new for every fresh start, kept across resumes) and a fingerprint: a hash of what defines
its training, i.e. the resolved config without the settings that may change between attempts of the same
run (`NOT_DEFINING`: paths that may move, how this attempt starts, logging), plus a fingerprint of each data
file (name, size and a hash of its first and last MiB; for a folder, its files' names and sizes; a hub id
as is) and, for a local `model.path`, a hash of its config.json. Both are written to `<output_dir>/run.json`
and into every checkpoint's seal (`train/resume.py`).

What a start in an output folder does with these: `train/run_folder.py`.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from llava_train.config import TrainJobConfig
from llava_train.files import write_json_atomic

RUN_FILE = "run.json"
LOCK_FILE = ".llava-train.lock"
STAGING = ".staging"  # temporary folders of checkpoints / final being written (train/trainer.py)
# Written by this attempt before the run folder is claimed (Hydra's copy of the config and its log).
NOT_RUN_FILES = (".hydra", LOCK_FILE, STAGING)
NOT_DEFINING = (
    "output_dir", "model.cache_dir", "logger",
    "data.train_path", "data.eval_path", "data.image_root", "data.sources.path", "data.sources.image_root",
    "data.num_workers", "data.prefetch_factor", "data.lazy_index_cache",
    "trainer.resume", "trainer.resume_other_run", "trainer.overwrite_output_dir", "trainer.disable_tqdm",
    "trainer.report_to", "trainer.preemption_signals", "eval.show_samples", "eval.table_rows",
)
HEAD = 1 << 20  # bytes hashed at each end of a data file


def data_fingerprint(path: Optional[str]) -> Any:
    """What identifies a data file without reading all of it: name, size, hash of its first and last MiB."""
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        size = p.stat().st_size
        h = hashlib.sha256()
        with open(p, "rb") as f:
            h.update(f.read(HEAD))
            if size > 2 * HEAD:
                f.seek(size - HEAD)
                h.update(f.read(HEAD))
        return {"name": p.name, "size": size, "sha256_ends": h.hexdigest()}
    if p.is_dir():  # a save_to_disk folder
        files = sorted((str(f.relative_to(p)), f.stat().st_size) for f in p.rglob("*") if f.is_file())
        return {"name": p.name, "files": files}
    return {"id": path}  # a hub dataset id


def _model_fingerprint(path: str) -> Any:
    p = Path(path)
    if (p / "config.json").is_file():  # a local folder may move: its name and config.json identify it
        return {"name": p.name, "config_sha256": hashlib.sha256((p / "config.json").read_bytes()).hexdigest()}
    return path  # a hub id or "tiny"


def _drop(tree: dict, dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    node = tree.get(head)
    if not rest:
        tree.pop(head, None)
    elif isinstance(node, dict):
        _drop(node, rest)
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, dict):
                _drop(item, rest)


def fingerprint_inputs(cfg: TrainJobConfig) -> dict[str, Any]:
    """The resolved config without `NOT_DEFINING`, with data and model fingerprints in place of paths."""
    tree = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    for key in NOT_DEFINING:
        _drop(tree, key)
    tree["model"]["path"] = _model_fingerprint(cfg.model.path)
    tree["data_files"] = {
        "train": data_fingerprint(cfg.data.train_path),
        "eval": data_fingerprint(cfg.data.eval_path),
        "sources": [data_fingerprint(s.path) for s in cfg.data.sources],
    }
    return tree


def fingerprint(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs (for the refusal message)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}")
    return out


@dataclass
class RunIdentity:
    run_id: str
    fingerprint: str
    inputs: dict[str, Any]
    created: str = ""

    @classmethod
    def new(cls, cfg: TrainJobConfig) -> "RunIdentity":
        inputs = fingerprint_inputs(cfg)
        return cls(f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}", fingerprint(inputs), inputs,
                   time.strftime("%Y-%m-%d %H:%M:%S"))

    @classmethod
    def read(cls, folder: Path) -> Optional["RunIdentity"]:
        f = Path(folder) / RUN_FILE
        if not f.is_file():
            return None
        d = json.loads(f.read_text())
        return cls(d["run_id"], d["fingerprint"], d.get("inputs", {}), d.get("created", ""))

    def write(self, folder: Path) -> None:
        write_json_atomic(Path(folder) / RUN_FILE, {"run_id": self.run_id, "fingerprint": self.fingerprint,
                                                     "created": self.created, "inputs": self.inputs})
