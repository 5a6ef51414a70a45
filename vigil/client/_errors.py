"""The client's one error type: every failed call becomes an `RPCError` here, and only
here, carrying the gRPC status, the server's message and whether a retry can help."""

from __future__ import annotations

import grpc

from vigil.core.errors import ConfigError, VigilError

# Worth retrying (elsewhere or later): the server or the network, not the request.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


class RPCError(VigilError):
    """A call Vigil refused or could not answer. `code` is the gRPC status;
    `retryable` says whether the same request may succeed later. `cancelled_remotely`:
    CANCELLED came from the other side (a replica that stops cancels the calls it still
    holds, or that arrive as it stops), so the call may be repeated like a lost one; a
    cancellation of the caller's own is asyncio.CancelledError, never an RPCError, and
    the client's own "session was stopped" is not remote."""

    def __init__(
        self, code: grpc.StatusCode, message: str, *, cancelled_remotely: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.cancelled_remotely = cancelled_remotely and code == grpc.StatusCode.CANCELLED

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE or self.cancelled_remotely

    def __str__(self) -> str:
        return f"{self.message} ({self.code.name})"


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def from_call_error(code: int, message: str) -> RPCError:
    """A request refused on a stream of requests (its `CallError`)."""
    status = _CODES.get(code, grpc.StatusCode.UNKNOWN)
    return RPCError(status, message or status.name.lower().replace("_", " "))


def from_grpc(exc: grpc.aio.AioRpcError | grpc.RpcError) -> RPCError:
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    return RPCError(
        code,
        details or code.name.lower().replace("_", " "),
        cancelled_remotely=code == grpc.StatusCode.CANCELLED,
    )


class ClientConfigError(ConfigError):
    """A bad client setting (address, TLS file, token file); the message names it."""
