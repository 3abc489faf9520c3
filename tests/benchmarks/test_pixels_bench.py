"""benchmarks/pixels.py (the README's pixel-path numbers) runs and checks both paths bit-identical first."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_pixels_benchmark_runs(tmp_path):
    out = tmp_path / "pixels.json"
    proc = subprocess.run([sys.executable, "benchmarks/pixels.py", "--repeats", "1", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["settings"]["processor"] == "LlavaNextImageProcessorPil"
    assert len(result["rows"]) == 7 and all(r["bit_identical"] and r["processor_ms"] > 0 for r in result["rows"])
    assert {r["patches"] for r in result["rows"]} >= {3, 5}  # square and landscape grids
    assert "| 640x480 | 5 |" in proc.stdout
