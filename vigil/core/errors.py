"""Vigil's one exception root, and the one place errors become gRPC statuses.

Domain errors carry their status code. `status_for` maps any exception to the status
and message a call ends with; `vigil.core.rpc.rpc` applies it around every servicer
method (unary, server-streaming and bidirectional alike), so an error raised anywhere
in a call, also in the middle of a stream, ends the call with a message a person can
act on; anything unexpected is logged and answered INTERNAL (never UNKNOWN).
Database failures become domain errors in `vigil.core.db`, by SQLSTATE and constraint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)

# Messages quote at most this much of a caller's input.
QUOTE_LIMIT = 80


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """A short, printable rendering of (possibly huge or hostile) input for a message."""
    text = value if isinstance(value, str) else str(value)
    shown = repr(text[:limit])
    return shown + f"… ({len(text)} characters)" if len(text) > limit else shown


class VigilError(Exception):
    """Root of every error Vigil raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class ConfigError(VigilError):
    """A bad environment variable or flag; the message names it."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidArgument(VigilError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(VigilError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(VigilError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(VigilError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(VigilError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(VigilError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(VigilError):
    """A per-identity cap (open streams, participants) is reached."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Aborted(VigilError):
    """A transaction lost a race (serialization failure, deadlock); retry it."""

    code = grpc.StatusCode.ABORTED


class Unavailable(VigilError):
    """This server cannot take the request now (shutting down); retry elsewhere."""

    code = grpc.StatusCode.UNAVAILABLE


class StorageError(VigilError):
    """The database failed or is unreachable; the request may be retried."""

    code = grpc.StatusCode.UNAVAILABLE


class Internal(VigilError):
    """A bug: something Vigil itself got wrong. Logged with its cause."""

    code = grpc.StatusCode.INTERNAL


F = TypeVar("F", bound=Callable[..., Any])


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message an exception ends a call with."""
    if isinstance(exc, VigilError):
        if exc.code == grpc.StatusCode.INTERNAL:
            log.error("internal error in RPC: %s", exc, exc_info=exc)
        return exc.code, str(exc)
    log.exception("unexpected error in RPC", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
