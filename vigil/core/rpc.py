"""What every servicer method goes through: authenticate the caller, check the declared
rule of the method (`vigil.core.auth.rules`), run it with the caller known
(`caller()`), and end the call with the status its outcome maps to
(`vigil.core.errors`). A stream also ends, UNAUTHENTICATED, the moment its credential is
revoked or expires.

Servicers using it have `service_name` (e.g. "vigil.v1.Tasks") and `auth` (an
Authenticator).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from vigil.core.auth.principal import Principal
from vigil.core.auth.rules import permit
from vigil.core.errors import Internal, Unauthenticated, status_for
from vigil.v1 import common_pb2

F = TypeVar("F", bound=Callable[..., Any])

_CALLER: contextvars.ContextVar[Principal] = contextvars.ContextVar("vigil_caller")
REVOKED = "the credential of this stream was revoked or expired"


def caller() -> Principal:
    """The authenticated principal of the call being served."""
    try:
        return _CALLER.get()
    except LookupError:
        raise Internal("no authenticated caller in this context") from None


async def _enter(self: Any, method: str, request: Any, context: Any) -> Principal:
    principal: Principal = await self.auth.authenticate(context)
    # A bidirectional stream's first message carries its target: its handler checks it.
    permit(principal, method, request)
    _CALLER.set(principal)
    return principal


async def _fail(context: Any, exc: BaseException) -> None:
    code, message = status_for(exc)
    await context.abort(code, message)


IN_FLIGHT = 256  # requests of one stream handled at once; more wait (flow control) unread


async def answer_each(
    context: Any,
    handle: Callable[[Any], Awaitable[Any]],
    refused: Callable[[Any, common_pb2.CallError], Any],
) -> None:
    """Serve a stream of requests, each a call of its own: handle each as it arrives
    (concurrently, up to IN_FLIGHT), write its answer as it is ready, in any order. A
    request that fails is answered with `refused(request, CallError)` — the status a
    unary call would have ended with — and the stream goes on. Ends once the caller has
    sent its last request and every answer is written."""
    room = asyncio.Semaphore(IN_FLIGHT)
    writing = asyncio.Lock()  # one write at a time on a call
    running: set[asyncio.Task[None]] = set()

    async def one(request: Any) -> None:
        try:
            answer = await handle(request)
        except Exception as exc:
            code, message = status_for(exc)
            answer = refused(request, common_pb2.CallError(code=code.value[0], message=message))
        try:
            async with writing:
                # A write fails only when the call is over; the read loop ends it then.
                with contextlib.suppress(Exception):
                    await context.write(answer)
        finally:
            room.release()  # in flight until its answer is written: a caller that reads
            # no answers stops being read

    try:
        while True:
            await room.acquire()
            request = await context.read()
            if request is grpc.aio.EOF:
                break
            task = asyncio.create_task(one(request))
            running.add(task)
            task.add_done_callback(running.discard)
        while running:
            await asyncio.wait(set(running))
    finally:
        # The call ended under them (cancelled, revoked, the server stopping): they end
        # too. Not awaited: a coroutine being closed must not wait for anything.
        for task in running:
            task.cancel()


def rpc(fn: F) -> F:
    """Decorate a servicer method (unary, server-streaming or bidirectional)."""
    name = fn.__name__

    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def streaming(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            method = f"{self.service_name}/{name}"
            try:
                principal = await _enter(self, method, request, context)
                revoked = self.auth.watch(principal)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _fail(context, exc)
                return
            gone = asyncio.ensure_future(revoked.wait())
            items = fn(self, request, context)
            nxt: asyncio.Future[Any] | None = None
            try:
                while True:
                    nxt = asyncio.ensure_future(anext(items))
                    await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                    if not nxt.done():
                        nxt.cancel()
                        with contextlib.suppress(BaseException):
                            await nxt
                        await _fail(context, Unauthenticated(REVOKED))
                        return
                    try:
                        item = nxt.result()
                    except StopAsyncIteration:
                        return
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _fail(context, exc)
            finally:
                gone.cancel()
                self.auth.unwatch(principal, revoked)
                if nxt is not None and not nxt.done():
                    # The call ended (the client cancelled it) while the handler was
                    # working: stop the handler too, and take its outcome ourselves.
                    nxt.cancel()
                    with contextlib.suppress(BaseException):
                        await nxt
                with contextlib.suppress(BaseException):
                    await items.aclose()

        return streaming  # type: ignore[return-value]

    bidirectional = "request_iterator" in inspect.signature(fn).parameters

    @functools.wraps(fn)
    async def unary(self: Any, request: Any, context: Any) -> Any:
        method = f"{self.service_name}/{name}"
        try:
            principal = await _enter(self, method, None if bidirectional else request, context)
            if not bidirectional:
                return await fn(self, request, context)
            revoked = self.auth.watch(principal)
            work = asyncio.ensure_future(fn(self, request, context))
            gone = asyncio.ensure_future(revoked.wait())
            try:
                await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not work.done():
                    work.cancel()
                    with contextlib.suppress(BaseException):
                        await work
                    raise Unauthenticated(REVOKED)
                return work.result()
            finally:
                gone.cancel()
                self.auth.unwatch(principal, revoked)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _fail(context, exc)

    return unary  # type: ignore[return-value]
