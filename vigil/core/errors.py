"""Vigil's one exception root, and the one place domain errors become gRPC statuses."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)


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


class Unavailable(VigilError):
    """This server cannot take the request now (shutting down); retry elsewhere."""

    code = grpc.StatusCode.UNAVAILABLE


class StorageError(VigilError):
    """The database failed or is unreachable; the request may be retried."""

    code = grpc.StatusCode.UNAVAILABLE


F = TypeVar("F", bound=Callable[..., Any])


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, VigilError):
        return exc.code, str(exc)
    log.exception("unexpected error in RPC", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


def grpc_errors(fn: F) -> F:
    """Decorate a servicer method: VigilError becomes its status code; anything else
    is logged and answered INTERNAL (never a bare UNKNOWN)."""
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def gen_wrapper(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in fn(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                code, message = _status_for(exc)
                await context.abort(code, message)

        return gen_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, message = _status_for(exc)
            await context.abort(code, message)

    return wrapper  # type: ignore[return-value]
