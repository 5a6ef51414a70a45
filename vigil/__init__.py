"""Vigil: the reliability control plane for teams of AI coding agents.

`vigil.client` is the library agents and tools import; `vigil.v1` is the generated gRPC
API it wraps. The services (`vigil.liveness_service`, `vigil.task_service`), the machine
daemon (`vigil.daemon`) and the command line (`vigil.cli`) are the rest of the program.
"""

from vigil.core.version import VERSION as __version__

__all__ = ["__version__"]
