"""Generate the gRPC code of `protos/` into `vigil/v1/` (never committed, never edited).

The one generator: `make proto` runs it for development, and the wheel build
(`setup.py`) runs it so an installed Vigil carries the code for the protos it was
built from. Message and stub type hints come from mypy-protobuf.

    python tools/protos.py [ROOT]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

PLUGINS = ("protoc-gen-mypy", "protoc-gen-mypy_grpc")


def _plugin(name: str) -> str:
    """The plugin next to this interpreter (a venv or an isolated build environment)."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"protos: {name} not found (pip install mypy-protobuf)")
    return found


def generate(root: Path) -> list[Path]:
    protos = sorted((root / "protos").rglob("*.proto"))
    if not protos:
        raise SystemExit(f"protos: no .proto files under {root / 'protos'}")
    out = root / "vigil" / "v1"
    for old in out.glob("*_pb2*"):
        old.unlink()
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{root / 'protos'}",
        *(f"--plugin={name}={_plugin(name)}" for name in PLUGINS),
        f"--python_out={root}",
        f"--grpc_python_out={root}",
        f"--mypy_out={root}",
        f"--mypy_grpc_out={root}",
        *map(str, protos),
    ]
    subprocess.run(cmd, check=True)
    return sorted(out.glob("*_pb2*"))


if __name__ == "__main__":
    generated = generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd())
    print(f"protos: generated {len(generated)} files in vigil/v1")
