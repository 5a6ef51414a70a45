"""The `vigil` command-line interface."""

import os

# The CLI starts processes (agents, daemons) while gRPC is loaded; gRPC's fork handlers
# only print warnings then. Set before anything imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
