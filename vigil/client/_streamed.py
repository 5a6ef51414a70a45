"""Calls of one kind carried on one stream (`SendMessages`, `CompleteAndClaimNextStream`):
opened at the first call and kept, because a message on an open stream costs the client
and the server a fraction of a unary call. Each request is written and waits for the
answer that names it (answers come in any order). When the stream ends, every call
still waiting fails with the stream's status, and the next call opens a new stream. A
stream the server will not open is no reason to fail the call: one that does not know
the stream (an earlier version: UNIMPLEMENTED) gets unary calls from then on, and one
that refuses another stream to this credential (RESOURCE_EXHAUSTED: it holds as many as
a replica allows) gets this call unary.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from vigil.client._errors import RPCError, from_grpc

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_UNARY_INSTEAD = frozenset({grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED})


class StreamedCalls:
    """`open()` starts the stream, `unary(request, timeout)` makes one call without it;
    a request's key is `request_key(request)`, an answer's `answer.<answer_key>`; an
    answer carries `<ok>` or `error` (a CallError)."""

    def __init__(
        self,
        open: Callable[[], grpc.aio.StreamStreamCall],
        unary: Callable[[Any, float], Awaitable[Any]],
        request_key: Callable[[Any], str],
        answer_key: str,
        ok: str,
        what: str,
    ) -> None:
        self._open_call = open
        self._unary = unary
        self._request_key = request_key
        self._answer_key = answer_key
        self._ok = ok
        self._what = what
        self.supported = True
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[str, list[asyncio.Future[Any]]] = {}
        self._writing = asyncio.Lock()
        self._ended: RPCError | None = None  # how the last stream ended

    async def call(self, request: Any, timeout: float) -> Any:
        """The answer to `request`; RPCError if it was refused, if no answer came within
        `timeout` (DEADLINE_EXCEEDED), or if the stream ended first (its status)."""
        if not self.supported:
            return await self._unary(request, timeout)
        try:
            return await self._on_stream(request, timeout)
        except RPCError as exc:
            if exc is self._ended and exc.code in _UNARY_INSTEAD:
                return await self._unary(request, timeout)
            raise

    async def _on_stream(self, request: Any, timeout: float) -> Any:
        key = self._request_key(request)
        call = self._open()
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(answer)
        try:
            async with self._writing:
                with contextlib.suppress(
                    grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError
                ):
                    await call.write(request)  # if the stream is over, the reader says so
            try:
                return await asyncio.wait_for(answer, timeout)
            except TimeoutError:
                raise RPCError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no answer to the {self._what} in {timeout:g} s",
                ) from None
        finally:
            waiting = self._waiting.get(key)
            if waiting is not None:
                with contextlib.suppress(ValueError):
                    waiting.remove(answer)
                if not waiting:
                    del self._waiting[key]

    def _open(self) -> grpc.aio.StreamStreamCall:
        if self._call is None:
            call = self._open_call()
            self._call = call
            self._reader = asyncio.create_task(self._read(call), name=f"vigil-{self._what}s")
        return self._call

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        error: RPCError
        try:
            async for answer in call:
                for waiting in self._waiting.get(getattr(answer, self._answer_key), ()):
                    if waiting.done():
                        continue
                    if answer.WhichOneof("result") == self._ok:
                        waiting.set_result(getattr(answer, self._ok))
                    else:
                        code = _CODES.get(answer.error.code, grpc.StatusCode.UNKNOWN)
                        waiting.set_exception(RPCError(code, answer.error.message))
                    break  # one answer, one call
            error = RPCError(
                grpc.StatusCode.UNAVAILABLE, f"the server ended the {self._what} stream"
            )
        except grpc.aio.AioRpcError as exc:
            error = from_grpc(exc)
            if error.code == grpc.StatusCode.UNIMPLEMENTED:
                self.supported = False
        except asyncio.CancelledError:
            error = RPCError(grpc.StatusCode.CANCELLED, "the client was closed")
        finally:
            if self._call is call:
                self._call = None
        self._ended = error
        for futures in self._waiting.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)

    async def close(self) -> None:
        call, reader = self._call, self._reader
        self._call = None
        if call is not None:
            call.cancel()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
