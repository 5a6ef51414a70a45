"""A client's sends over one `SendMessages` stream, opened at the first send and kept:
a send on a stream costs the client and the server a fraction of a unary call. Each
send is written with its request id and waits for the answer that names it; answers
come in any order. When the stream ends, every send still waiting fails with the
stream's status (`Client.send` repeats it, the same, on a new stream). A server that
does not know SendMessages (an older version) gets unary SendMessage calls instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import grpc

from vigil.client._errors import RPCError, from_grpc
from vigil.v1 import tasks_pb2 as tpb

if TYPE_CHECKING:
    from vigil.client._client import Client

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class SendStream:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.supported = True  # False once the server said SendMessages is unimplemented
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[str, list[asyncio.Future[tpb.Task]]] = {}
        self._writing = asyncio.Lock()

    async def send(self, request: tpb.SendMessageRequest, timeout: float) -> tpb.Task:
        """The task of one send (`request.request_id` set); RPCError if it was refused,
        if its answer did not come within `timeout`, or if the stream ended first."""
        call = self._open()
        answer: asyncio.Future[tpb.Task] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(request.request_id, []).append(answer)
        try:
            async with self._writing:
                try:
                    await call.write(request)
                except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                    # The stream is over: the reader fails `answer` with its status.
                    pass
            try:
                return await asyncio.wait_for(answer, timeout)
            except TimeoutError:
                raise RPCError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer to the send in {timeout:g} s"
                ) from None
        finally:
            waiting = self._waiting.get(request.request_id)
            if waiting is not None:
                with contextlib.suppress(ValueError):
                    waiting.remove(answer)
                if not waiting:
                    del self._waiting[request.request_id]

    def _open(self) -> grpc.aio.StreamStreamCall:
        if self._call is None:
            call = self.client.tasks.SendMessages(metadata=self.client.metadata)
            self._call = call
            self._reader = asyncio.create_task(self._read(call), name="vigil-sends")
        return self._call

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        error: RPCError
        try:
            async for result in call:
                for answer in self._waiting.get(result.request_id, ()):
                    if answer.done():
                        continue
                    if result.WhichOneof("result") == "task":
                        answer.set_result(result.task)
                    else:
                        code = _CODES.get(result.error.code, grpc.StatusCode.UNKNOWN)
                        answer.set_exception(RPCError(code, result.error.message))
            error = RPCError(grpc.StatusCode.UNAVAILABLE, "the server ended the send stream")
        except grpc.aio.AioRpcError as exc:
            error = from_grpc(exc)
            if error.code == grpc.StatusCode.UNIMPLEMENTED:
                self.supported = False
        except asyncio.CancelledError:
            error = RPCError(grpc.StatusCode.CANCELLED, "the client was closed")
        finally:
            if self._call is call:
                self._call = None
        for waiting in self._waiting.values():
            for answer in waiting:
                if not answer.done():
                    answer.set_exception(error)

    async def close(self) -> None:
        call, reader = self._call, self._reader
        self._call = None
        if call is not None:
            call.cancel()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
