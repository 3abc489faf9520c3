"""Where the configs and the demo data live, in a source checkout and in an installed wheel.

A checkout keeps them at the top level (`configs/`, `data/demo/`: the files people edit); a wheel carries
copies in `llava_train/_resources/` (setup.py copies them at build time). `${llava_root:}` in the YAML
files resolves to this folder.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def resource_root() -> Path:
    """The folder holding `configs/` and `data/demo/`: inside an installed wheel, else the source checkout."""
    packaged = PACKAGE / "_resources"
    return packaged if (packaged / "configs" / "train.yaml").is_file() else PACKAGE.parent


ROOT = resource_root()
CONFIG_DIR = ROOT / "configs"
DEMO_DATA = ROOT / "data" / "demo"
