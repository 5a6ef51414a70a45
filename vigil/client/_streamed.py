"""Calls of one kind carried on one stream (`SendMessages`, `CompleteAndClaimNextStream`):
opened at the first call and kept, because a message on an open stream costs the client
and the server a fraction of a unary call. A call queues its request for the stream's
one writer and waits for the answer that names it (answers come in any order); its
timeout covers both. A caller cancelled while it waits leaves the stream alone (only
the writer writes, so nobody cancels the RPC in the middle of a write). When the stream
ends, every call still waiting fails with the stream's status, and the next call opens
a new stream. A stream the server will not open is no reason to fail the call: one that
does not know the stream (an earlier version: UNIMPLEMENTED) gets unary calls from then
on, and one that refuses another stream to this credential (RESOURCE_EXHAUSTED before
any answer: it holds as many as a replica allows) gets this call unary.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from vigil.client._errors import RPCError, from_call_error, from_grpc

_UNARY_INSTEAD = frozenset({grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED})


class _Refused(RPCError):
    """The server would not open the stream (no answer came on it): go unary."""


@dataclass
class _Stream:
    call: grpc.aio.StreamStreamCall
    outbox: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class StreamedCalls:
    """`open()` starts the stream, `unary(request, timeout)` makes one call without it;
    `request_key(request)` and `answer_key(answer)` name the call an answer is for; an
    answer carries `<ok>` or `error` (a CallError)."""

    def __init__(
        self,
        open: Callable[[], grpc.aio.StreamStreamCall],
        unary: Callable[[Any, float], Awaitable[Any]],
        request_key: Callable[[Any], str],
        answer_key: Callable[[Any], str],
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
        self._stream: _Stream | None = None
        self._waiting: dict[str, list[asyncio.Future[Any]]] = {}

    async def call(self, request: Any, timeout: float) -> Any:
        """The answer to `request`; RPCError if it was refused, if no answer came within
        `timeout` (DEADLINE_EXCEEDED), or if the stream ended first (its status)."""
        if not self.supported:
            return await self._unary(request, timeout)
        try:
            return await self._on_stream(request, timeout)
        except _Refused:
            return await self._unary(request, timeout)

    async def _on_stream(self, request: Any, timeout: float) -> Any:
        key = self._request_key(request)
        stream = self._open()
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(answer)
        stream.outbox.put_nowait(request)
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

    def _open(self) -> _Stream:
        if self._stream is None:
            stream = _Stream(self._open_call())
            stream.tasks = [
                asyncio.create_task(self._write(stream), name=f"vigil-{self._what}s-out"),
                asyncio.create_task(self._read(stream), name=f"vigil-{self._what}s-in"),
            ]
            self._stream = stream
        return self._stream

    @staticmethod
    async def _write(stream: _Stream) -> None:
        """The stream's one writer: each queued request in turn, until the stream ends
        (the reader says why)."""
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            while True:
                await stream.call.write(await stream.outbox.get())

    async def _read(self, stream: _Stream) -> None:
        answered = False
        error: RPCError = RPCError(
            grpc.StatusCode.UNAVAILABLE, f"the server ended the {self._what} stream"
        )
        try:
            async for answer in stream.call:
                answered = True
                for waiting in self._waiting.get(self._answer_key(answer), ()):
                    if waiting.done():
                        continue
                    if answer.WhichOneof("result") == self._ok:
                        waiting.set_result(getattr(answer, self._ok))
                    elif answer.WhichOneof("result") == "error":
                        waiting.set_exception(
                            from_call_error(answer.error.code, answer.error.message)
                        )
                    else:
                        waiting.set_exception(
                            RPCError(grpc.StatusCode.UNKNOWN, f"an empty {self._what} answer")
                        )
                    break  # one answer, one call
        except grpc.aio.AioRpcError as exc:
            error = from_grpc(exc)
            if error.code == grpc.StatusCode.UNIMPLEMENTED:
                self.supported = False
            if error.code in _UNARY_INSTEAD and not answered:
                error = _Refused(error.code, error.message)
        except asyncio.CancelledError:
            error = RPCError(grpc.StatusCode.CANCELLED, "the client was closed")
        finally:
            self._end(stream, error)

    def _end(self, stream: _Stream, error: RPCError) -> None:
        """The stream is over: its writer stops, and every call still waiting fails."""
        if self._stream is stream:
            self._stream = None
        stream.tasks[0].cancel()
        for futures in self._waiting.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        stream.call.cancel()
        for task in stream.tasks:
            task.cancel()
        for task in stream.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
