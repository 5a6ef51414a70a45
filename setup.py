"""Build hook: the wheel carries the gRPC code generated from `protos/` at build time
(the generated files are never committed). Everything else is in pyproject.toml."""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        sys.path.insert(0, str(ROOT / "tools"))
        from protos import generate

        generate(ROOT)
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
