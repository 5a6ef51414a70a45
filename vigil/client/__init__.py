"""The Vigil client: the one place where channels, endpoints, TLS, credentials and
retries are made, and where a participant's session lives.

    from vigil.client import connect

    async with connect() as client:               # VIGIL_ADDR, token and TLS from the env
        async with client.agent() as agent:        # VIGIL_CHATROOM / VIGIL_ROLE / VIGIL_KIND
            async for task in agent.tasks():
                await task.start()
                ...
                await task.complete()

Every failed call raises `RPCError` (its `code` is the gRPC status; `retryable` says
whether trying again can help). What this module exports is the public surface; the
`_`-prefixed modules behind it may change.
"""

from vigil.client._agent import AgentSession, ClaimedTask, Superseded
from vigil.client._client import Client, connect
from vigil.client._config import ClientConfig, TlsConfig, find_token
from vigil.client._errors import RETRYABLE, ClientConfigError, RPCError
from vigil.client._session import Beat, ParticipantSession, SessionEnd
from vigil.core.config import grpc_target

__all__ = [
    "RETRYABLE",
    "AgentSession",
    "Beat",
    "ClaimedTask",
    "Client",
    "ClientConfig",
    "ClientConfigError",
    "ParticipantSession",
    "RPCError",
    "SessionEnd",
    "Superseded",
    "TlsConfig",
    "connect",
    "find_token",
    "grpc_target",
]
