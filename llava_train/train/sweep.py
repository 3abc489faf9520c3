"""`llava sweep-report DIR`: one table (and a plot) for the runs of a Hydra multirun folder.

Each run of `llava train -m ...` has its own folder under the sweep folder, holding
`.hydra/overrides.yaml` (what this run changed) and `metrics.json` (written by the recipe). Runs
without metrics.json (failed, preempted or still running) are listed with their status.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

METRICS = "metrics.json"
OVERRIDES = Path(".hydra") / "overrides.yaml"
COLUMNS = ["run", "overrides", "status", "final_loss", "eval_accuracy", "samples_per_s", "train_s"]


@dataclass
class Run:
    folder: Path
    overrides: list[str]
    metrics: Optional[dict[str, Any]]
    status: str = "done"
    loss_history: list = field(default_factory=list)


def find_runs(sweep_dir: Path) -> list[Run]:
    """Every run folder under `sweep_dir` (a folder with .hydra/overrides.yaml), in job-number order."""
    runs = []
    for ov in sorted(sweep_dir.rglob(str(OVERRIDES)), key=lambda p: _sort_key(p.parent.parent, sweep_dir)):
        folder = ov.parent.parent
        overrides = [str(o) for o in (yaml.safe_load(ov.read_text()) or [])]
        metrics_file = folder / METRICS
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
        status = "done" if metrics else "no metrics.json (failed or running)"
        if metrics and metrics.get("preempted"):
            status = "preempted"
        runs.append(Run(folder, overrides, metrics, status, (metrics or {}).get("loss_history", [])))
    return runs


def _sort_key(folder: Path, root: Path):
    rel = folder.relative_to(root).parts
    return [(0, int(p)) if p.isdigit() else (1, p) for p in rel]


def varying(runs: list[Run]) -> list[list[str]]:
    """Each run's overrides without those shared by every run (the swept values stand out)."""
    if not runs:
        return []
    common = set(runs[0].overrides).intersection(*(set(r.overrides) for r in runs[1:]))
    return [[o for o in r.overrides if o not in common] for r in runs]


def rows(runs: list[Run], sweep_dir: Path) -> list[dict[str, Any]]:
    out = []
    for run, ovs in zip(runs, varying(runs)):
        m = run.metrics or {}
        out.append({
            "run": str(run.folder.relative_to(sweep_dir)) or ".",
            "overrides": " ".join(ovs) or "(none)",
            "status": run.status,
            "final_loss": m.get("train_loss"),
            "eval_accuracy": m.get("eval_accuracy"),
            "samples_per_s": m.get("train_samples_per_second"),
            "train_s": m.get("train_seconds"),
        })
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(table: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in table]
    return "\n".join(lines)


def plot(runs: list[Run], table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run, row in zip(runs, table):
        if run.loss_history:
            steps, losses = zip(*run.loss_history)
            ax_loss.plot(steps, losses, marker=".", label=row["overrides"])
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("loss per run")
    if any(r.loss_history for r in runs):
        ax_loss.legend(fontsize=7)
    labels = [r["overrides"] for r in table]
    acc = [r["eval_accuracy"] if r["eval_accuracy"] is not None else 0.0 for r in table]
    ax_acc.barh(range(len(labels)), acc)
    ax_acc.set_yticks(range(len(labels)), labels, fontsize=7)
    ax_acc.set_xlabel("eval accuracy (exact match)")
    ax_acc.set_xlim(0, 1)
    ax_acc.set_title("eval accuracy per run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(sweep_dir: str, out_dir: str = "") -> dict[str, Path]:
    """Write sweep_report.{md,csv,png} (into `out_dir`, default the sweep folder) and print the table."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise SystemExit(f"sweep-report: {sweep_dir!r} is not a folder")
    runs = find_runs(root)
    if not runs:
        raise SystemExit(f"sweep-report: no runs under {sweep_dir!r} (looked for */{OVERRIDES})")
    table = rows(runs, root)
    out = Path(out_dir) if out_dir else root
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "sweep_report.md", "csv": out / "sweep_report.csv", "png": out / "sweep_report.png"}
    text = markdown(table)
    paths["md"].write_text(text + "\n")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(table)
    plot(runs, table, paths["png"])
    print(text)
    print(f"\n{len(runs)} runs; table: {paths['md']} and {paths['csv']}; plot: {paths['png']}", flush=True)
    return paths
