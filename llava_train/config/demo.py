"""The demo is one explicit choice, the default only while the command line names nothing real.

`llava train` selects `experiment=demo` (the tiny model, the bundled data and its recipe) and `llava
preview` / `llava doctor` select `data=demo`. Hydra's defaults list cannot depend on values, so the rule
"naming a model or data drops the demo" is applied to the override list before composition: the CLI
calls `demo_overrides`, and so do tests that want to compose exactly what a command line gives.
"""

from __future__ import annotations

TINY = "tiny"
# the defaults-list entry that holds each subcommand's demo
DEMO_ENTRY = {"train": "experiment", "plan": "experiment", "preview": "data", "doctor": "data"}
# overrides that name real data (any value)
DATA_KEYS = ("data", "data.train_path", "data.sources")
# overrides that name a model unless their value is the tiny one
MODEL_KEYS = ("model", "model.path")


def _key_value(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value.strip().strip("'\"")


def names_real_run(overrides: list[str], *, models: bool = True) -> bool:
    """True when the overrides name training data, or (with `models`) a model other than the tiny one."""
    for o in overrides:
        if o.startswith("-") or "=" not in o:
            continue
        key, value = _key_value(o)
        if key in DATA_KEYS or (models and key in MODEL_KEYS and value != TINY):
            return True
    return False


def demo_overrides(command: str, overrides: list[str]) -> list[str]:
    """`overrides` plus the deletion of the demo entry (`~experiment` for train, `~data` for preview and
    doctor) when they name data (train: or a model) and choose no option of that group themselves."""
    entry = DEMO_ENTRY.get(command)
    if entry is None or any(_key_value(o)[0] == entry for o in overrides if not o.startswith("-")):
        return list(overrides)
    if names_real_run(overrides, models=entry == "experiment"):
        return [*overrides, f"~{entry}"]
    return list(overrides)
