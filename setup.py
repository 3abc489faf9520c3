"""Packaging hook (everything else is in pyproject.toml): a wheel carries the top-level `configs/` and
`data/demo/` as `llava_train/_resources/{configs,data/demo}` (found by `llava_train.resources`). The
top-level folders stay the files people edit; editable installs read them in place."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RESOURCES = ("configs", "data/demo")


class BuildPyWithResources(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        here = Path(__file__).resolve().parent
        for folder in RESOURCES:
            self.copy_tree(str(here / folder), str(Path(self.build_lib) / "llava_train" / "_resources" / folder))


setup(cmdclass={"build_py": BuildPyWithResources})
