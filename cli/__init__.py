"""The `vigil` command-line interface."""

import os

# The CLI starts processes (agents, daemons) while gRPC is loaded; gRPC's fork handlers
# only print warnings then. Set before anything imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# gRPC's own log lines (a failed TLS handshake, a port already bound) would break the
# CLI's one-line errors and flood a server's log with every stranger's attempt: Vigil
# reports what went wrong itself. GRPC_VERBOSITY=debug (or error) brings them back.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
