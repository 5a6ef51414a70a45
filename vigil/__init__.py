"""Vigil: the reliability control plane for teams of AI coding agents.

`vigil.client` is the library agents and tools import; `vigil.v1` is the generated gRPC
API it wraps. The services (`vigil.liveness_service`, `vigil.task_service`), the machine
daemon (`vigil.daemon`) and the command line (`vigil.cli`) are the rest of the program.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("vigil")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
