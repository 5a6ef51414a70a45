"""The client side of a liveness Session: join, heartbeat, and leave on every exit
path; resume after the server goes away; rejoin when told; exit when superseded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from vigil.cli.rpc import CliError
from vigil.v1 import liveness_pb2 as pb
from vigil.v1 import liveness_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_SUPERSEDED = 3

# A non-retryable answer: the request itself is wrong, retrying cannot help.
_FATAL = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.NOT_FOUND,
}

KINDS = {"remote": pb.AGENT_KIND_REMOTE, "custom": pb.AGENT_KIND_CUSTOM}
LEAVE_REASONS = {
    "left": pb.OFFLINE_REASON_LEFT,
    "task_received": pb.OFFLINE_REASON_TASK_RECEIVED,
    "signal": pb.OFFLINE_REASON_SIGNAL,
    "error": pb.OFFLINE_REASON_ERROR,
}


@dataclass
class Stop:
    reason: str  # a leave reason
    exit_code: int
    message: str = ""


class _Outcome(Exception):
    """How one stream ended: rejoin, reconnect after a delay, or exit."""

    def __init__(self, action: str, delay: float = 0.0, exit_code: int = 0, message: str = ""):
        super().__init__(action)
        self.action = action
        self.delay = delay
        self.exit_code = exit_code
        self.message = message


class SessionClient:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        addr: str,
        chatroom: str,
        role: str,
        kind: str,
        say: Callable[[str], None],
    ) -> None:
        self.stub = pb_grpc.LivenessStub(channel)
        self.addr = addr
        self.chatroom = chatroom
        self.role = role
        self.kind = kind
        self.say = say
        self.connection_id = str(uuid.uuid4())
        self.epoch: int | None = None
        self.interval = 30.0
        self.ttl = 60.0
        self.ready_until = None
        self._stop: asyncio.Future[Stop] | None = None
        self.joined = asyncio.Event()
        self.left = False  # a leave was already recorded on the way out

    def request_stop(self, stop: Stop) -> None:
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(stop)

    async def run(self) -> int:
        """Hold the session until a stop is requested or the session is superseded."""
        self._stop = asyncio.get_running_loop().create_future()
        attempt = 0
        while True:
            try:
                await self._one_stream()
            except _Outcome as out:
                if out.action == "exit":
                    if out.message:
                        self.say(out.message)
                    return out.exit_code
                if out.action == "rejoin":
                    self.say(
                        f"participant {self.chatroom}/{self.role} epoch {self.epoch} is no "
                        "longer live; rejoining"
                    )
                    self.epoch = None
                    continue
                attempt = 0 if out.delay else attempt
                if await self._sleep_or_stop(out.delay):
                    return await self._leave_unary()
                continue
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _FATAL:
                    raise CliError(f"{exc.details()} ({exc.code().name})") from None
                if self.epoch is None and not self.joined.is_set():
                    raise CliError(
                        f"Vigil at {self.addr} is unavailable: {exc.details()}"
                    ) from None
                attempt += 1
                # Back off, but retry often enough to resume before the TTL runs out.
                cap = min(2.0, self.ttl / 5)
                delay = min(cap, 0.05 * 2 ** min(attempt, 8)) * random.uniform(0.5, 1.0)
                log.info(
                    "session stream failed (%s); reconnecting in %.2fs", exc.code().name, delay
                )
                if await self._sleep_or_stop(delay):
                    return await self._leave_unary()

    async def _sleep_or_stop(self, delay: float) -> bool:
        """Sleep; True if a stop was requested meanwhile."""
        assert self._stop is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._stop), timeout=delay)
        return self._stop.done()

    async def _leave_unary(self) -> int:
        assert self._stop is not None
        stop = self._stop.result()
        await self.leave(stop.reason)
        if stop.message:
            self.say(stop.message)
        return stop.exit_code

    async def leave(self, reason: str) -> bool:
        """Leave with the unary RPC (no stream at hand); True if it was recorded."""
        if self.epoch is None:
            return False
        try:
            await self.stub.Leave(
                pb.LeaveRequest(
                    chatroom=self.chatroom,
                    role=self.role,
                    epoch=self.epoch,
                    connection_id=self.connection_id,
                    reason=LEAVE_REASONS[reason],
                ),
                timeout=2,
            )
        except grpc.aio.AioRpcError:
            return False
        return True

    def _first_message(self) -> pb.SessionRequest:
        if self.epoch is None:
            return pb.SessionRequest(
                join=pb.JoinRequest(
                    chatroom=self.chatroom,
                    role=self.role,
                    kind=KINDS[self.kind],
                    connection_id=self.connection_id,
                )
            )
        return pb.SessionRequest(
            resume=pb.HeartbeatRequest(
                chatroom=self.chatroom,
                role=self.role,
                epoch=self.epoch,
                connection_id=self.connection_id,
            )
        )

    async def _one_stream(self) -> None:
        assert self._stop is not None
        call = self.stub.Session()
        # Never cancel a task that is inside call.read()/write(): grpc.aio cancels the
        # whole RPC then. The beater stops through an event; the reader runs to the end.
        quiet = asyncio.Event()
        reader: asyncio.Task[None] | None = None
        try:
            await call.write(self._first_message())
            first_read = asyncio.ensure_future(call.read())
            await asyncio.wait({first_read, self._stop}, return_when=asyncio.FIRST_COMPLETED)
            if not first_read.done():
                raise _Outcome("reconnect", delay=0)  # stopping: run() leaves and exits
            self._on_first(first_read.result())
            beater = asyncio.create_task(self._beat(call, quiet))
            reader = asyncio.create_task(self._read(call))
            try:
                waits: set[asyncio.Future[Any]] = {reader, self._stop}
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                quiet.set()
                await asyncio.wait({beater}, timeout=1)
            if reader in done:
                reader.result()  # raises the outcome
                raise _Outcome("reconnect", delay=0.1)
            stop = self._stop.result()
            await self._leave_stream(call, reader, stop)
            raise _Outcome("exit", exit_code=stop.exit_code, message=stop.message)
        except (_Outcome, grpc.aio.AioRpcError):
            raise
        except Exception:
            # Our own failure while the stream is up: leave on it with reason `error`
            # before the stream closes (a close alone would read as a dropped stream).
            if self.joined.is_set() and not call.done():
                await self._leave_stream(call, reader, Stop("error", 1))
                self.left = True
            raise
        finally:
            call.cancel()

    def _on_first(self, first: object) -> None:
        if first is grpc.aio.EOF or not isinstance(first, pb.SessionResponse):
            raise _Outcome("reconnect", delay=0.2)
        which = first.WhichOneof("msg")
        if which == "joined":
            p = first.joined.participant
            resumed = self.epoch == p.epoch
            self.epoch = p.epoch
            self.interval = first.joined.heartbeat_interval_ms / 1000
            self.ttl = first.joined.ttl_ms / 1000
            self.joined.set()
            if resumed:
                self.say(f"resumed {p.chatroom}/{p.role} (epoch {p.epoch})")
            else:
                self.say(
                    f"joined {p.chatroom}/{p.role} as {self.kind} (epoch {p.epoch}); "
                    "waiting for a task"
                )
            return
        if which == "heartbeat":
            self._on_status(first.heartbeat.status)
        raise _Outcome("reconnect", delay=0.2)

    def _on_status(self, status: int) -> None:
        if status == pb.HEARTBEAT_STATUS_REJOIN_REQUIRED:
            raise _Outcome("rejoin")
        if status == pb.HEARTBEAT_STATUS_SUPERSEDED:
            raise _Outcome(
                "exit",
                exit_code=EXIT_SUPERSEDED,
                message=(
                    f"error: superseded: another wait-for-task took {self.chatroom}/{self.role}; "
                    "exiting"
                ),
            )

    async def _beat(self, call: grpc.aio.StreamStreamCall, quiet: asyncio.Event) -> None:
        beat = pb.SessionRequest(heartbeat=pb.SessionRequest.Beat())
        while not quiet.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(quiet.wait(), self.interval)
            if quiet.is_set():
                return
            try:
                await call.write(beat)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return  # the reader sees why the stream ended

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        """Handle server messages until the stream ends; returns normally only after
        the server confirmed a leave (or closed the stream after one)."""
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                if self._stop is not None and self._stop.done():
                    return
                raise _Outcome("reconnect", delay=0.1)
            which = msg.WhichOneof("msg")
            if which == "heartbeat":
                if msg.heartbeat.status == pb.HEARTBEAT_STATUS_OK:
                    self.ready_until = msg.heartbeat.ready_until
                else:
                    self._on_status(msg.heartbeat.status)
            elif which == "left":
                return
            elif which == "reconnect":
                delay = msg.reconnect.delay_ms / 1000
                self.say(f"server is restarting; reconnecting in {delay:.2f}s")
                raise _Outcome("reconnect", delay=max(delay, 0.01))

    async def _leave_stream(
        self, call: grpc.aio.StreamStreamCall, reader: asyncio.Task[None] | None, stop: Stop
    ) -> None:
        leave = pb.SessionRequest(leave=pb.SessionRequest.Leave(reason=LEAVE_REASONS[stop.reason]))
        try:
            await call.write(leave)
            if reader is None:
                reader = asyncio.create_task(self._read(call))
            await asyncio.wait_for(asyncio.shield(reader), 2)
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.done_writing()
            return
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError, _Outcome):
            pass
        # The stream broke while leaving: fall back to the unary Leave.
        await self.leave(stop.reason)
