"""A participant's liveness session, client side: join over a bidirectional stream,
heartbeat in the background, resume the same participant after the server goes away,
rejoin by itself when told it is no longer live, end when superseded, and leave with a
reason on every exit path.

The one join/heartbeat loop of Vigil: the CLI's `wait-for-task`, the machine daemon's
presence, agents (through `AgentSession`), the benchmarks and the test agents all hold
their session through this class.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import grpc

from vigil.client._errors import RPCError, from_grpc
from vigil.core.vocab import LEAVE_REASONS, AgentKind, OfflineReason
from vigil.v1 import liveness_pb2 as pb

if TYPE_CHECKING:
    from vigil.client._client import Client

log = logging.getLogger("vigil.client")

# A refusal of the request itself: retrying the same stream cannot help.
_FATAL = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
LEAVE_TIMEOUT_S = 2.0


def _leave_reason(reason: OfflineReason | str) -> OfflineReason:
    value = OfflineReason(reason)
    if value not in LEAVE_REASONS:
        raise ValueError(f"{value} is the server's reason to record, not a leave reason")
    return value


class SessionEnd(enum.StrEnum):
    """How `ParticipantSession.run()` ended."""

    LEFT = "left"  # a stop was requested, and the leave was recorded (or tried)
    SUPERSEDED = "superseded"  # a newer join took the role: this process must stop


@dataclass(frozen=True)
class Beat:
    """One acknowledged heartbeat, for callers that measure (`on_heartbeat`)."""

    sent_wall: float  # time.time() when written
    scheduled_wall: float  # when it was due
    ack_s: float  # written -> answer read
    ok: bool


class _Outcome(Exception):
    """How one stream ended: rejoin, reconnect after a delay, or end."""

    def __init__(self, action: str, delay: float = 0.0, end: SessionEnd | None = None) -> None:
        super().__init__(action)
        self.action = action
        self.delay = delay
        self.end = end


class ParticipantSession:
    """Hold the participant (chatroom, role) live until `stop()` or a supersede.

    `say` receives one human-readable line per event (joined, resumed, rejoining,
    superseded); `on_heartbeat` each acknowledged beat. With `beat_offset`, beats fall
    on wall-clock multiples of the interval plus that offset (load generators spread
    their participants this way); by default they follow the join.
    """

    def __init__(
        self,
        client: Client,
        chatroom: str,
        role: str,
        kind: AgentKind | str = AgentKind.CUSTOM,
        *,
        say: Callable[[str], None] | None = None,
        on_heartbeat: Callable[[Beat], None] | None = None,
        beat_offset: float | None = None,
    ) -> None:
        self.client = client
        self.chatroom = chatroom
        self.role = role
        self.kind = AgentKind(kind)
        self.say = say or (lambda line: log.info("%s", line))
        self.on_heartbeat = on_heartbeat
        self.beat_offset = beat_offset
        self.connection_id = str(uuid.uuid4())
        self.epoch: int | None = None
        self.interval = client.config.timings.heartbeat_interval
        self.ttl = client.config.timings.heartbeat_ttl
        self.ready_until: datetime | None = None
        self.joined = asyncio.Event()  # set while joined; cleared on a rejoin
        self.generation = 0  # counts joins (a rejoin gives a new epoch)
        self._rejoined = asyncio.Event()  # set (and replaced) on every new join
        self.left = False  # a leave was recorded on the way out
        self._stop: asyncio.Future[OfflineReason] | None = None
        self._sent: tuple[float, float, float] | None = None  # last beat: wall, due, perf

    # -- control -----------------------------------------------------------

    def stop(self, reason: OfflineReason | str = OfflineReason.LEFT) -> None:
        """Ask `run()` to leave with `reason` and return."""
        if self._stop is None:
            self._stop = asyncio.get_running_loop().create_future()
        if not self._stop.done():
            self._stop.set_result(_leave_reason(reason))

    @property
    def stopping(self) -> bool:
        return self._stop is not None and self._stop.done()

    async def wait_joined(self) -> int:
        """The epoch, once joined."""
        await self.joined.wait()
        assert self.epoch is not None
        return self.epoch

    async def wait_rejoin(self, generation: int) -> None:
        """Return once a join newer than `generation` happened."""
        while self.generation == generation:
            await self._rejoined.wait()

    # -- the loop ------------------------------------------------------------

    async def run(self) -> SessionEnd:
        """Hold the session until a stop is requested (returns LEFT, after leaving) or
        the role is taken by a newer join (SUPERSEDED). A refusal (bad chatroom, no
        permission) or a server never reached before the first join is an RPCError."""
        if self._stop is None:
            self._stop = asyncio.get_running_loop().create_future()
        attempt = 0
        while True:
            try:
                await self._one_stream()
            except _Outcome as out:
                if out.action == "end":
                    assert out.end is not None
                    return out.end
                if out.action == "rejoin":
                    self.say(
                        f"participant {self.chatroom}/{self.role} epoch {self.epoch} is no "
                        "longer live; rejoining"
                    )
                    self.epoch = None
                    self.joined.clear()
                    continue
                attempt = 0 if out.delay else attempt
                if await self._sleep_or_stop(out.delay):
                    return await self._leave_unary()
                continue
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _FATAL:
                    raise from_grpc(exc) from None
                if self.epoch is None and self.generation == 0:
                    raise RPCError(
                        exc.code(),
                        f"Vigil at {self.client.config.liveness_addr} is "
                        f"unavailable: {exc.details()}",
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

    async def _leave_unary(self) -> SessionEnd:
        assert self._stop is not None
        self.left = await self.leave(self._stop.result())
        return SessionEnd.LEFT

    async def leave(self, reason: OfflineReason | str) -> bool:
        """Leave with the unary RPC (no stream at hand); True if it was recorded."""
        if self.epoch is None:
            return False
        request = pb.LeaveRequest(
            chatroom=self.chatroom,
            role=self.role,
            epoch=self.epoch,
            connection_id=self.connection_id,
            reason=_leave_reason(reason).to_pb(),
        )
        try:
            await self.client.liveness.Leave(
                request, timeout=LEAVE_TIMEOUT_S, metadata=self.client.metadata
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
                    kind=self.kind.to_pb(),
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
        call = self.client.liveness.Session(metadata=self.client.metadata)
        # Never cancel a task that is inside call.read()/write(): grpc.aio cancels the
        # whole RPC then. The beater stops through an event; the reader runs to the end.
        quiet = asyncio.Event()
        reader: asyncio.Task[None] | None = None
        try:
            await call.write(self._first_message())
            first_read = asyncio.ensure_future(call.read())
            await asyncio.wait({first_read, self._stop}, return_when=asyncio.FIRST_COMPLETED)
            if not first_read.done():
                raise _Outcome("reconnect", delay=0)  # stopping: run() leaves and returns
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
            await self._leave_stream(call, reader, self._stop.result())
            raise _Outcome("end", end=SessionEnd.LEFT)
        except (_Outcome, grpc.aio.AioRpcError):
            raise
        except BaseException:
            # Our own failure (or cancellation) while the stream is up: leave with reason
            # `error` before the stream closes (a close alone reads as a dropped stream).
            if self.joined.is_set() and not call.done() and not self.left:
                reason = self._stop.result() if self._stop.done() else OfflineReason.ERROR
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._leave_stream(call, reader, reason))
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
            if not resumed:
                self.generation += 1
                self._rejoined.set()
                self._rejoined = asyncio.Event()
            self.joined.set()
            if resumed:
                self.say(f"resumed {p.chatroom}/{p.role} (epoch {p.epoch})")
            else:
                self.say(f"joined {p.chatroom}/{p.role} as {self.kind} (epoch {p.epoch})")
            return
        if which == "heartbeat":
            self._on_status(first.heartbeat.status)
        raise _Outcome("reconnect", delay=0.2)

    def _on_status(self, status: int) -> None:
        if status == pb.HEARTBEAT_STATUS_REJOIN_REQUIRED:
            raise _Outcome("rejoin")
        if status == pb.HEARTBEAT_STATUS_SUPERSEDED:
            self.joined.clear()
            self.say(f"superseded: another session took {self.chatroom}/{self.role}")
            raise _Outcome("end", end=SessionEnd.SUPERSEDED)

    def _next_beat(self, last_due: float) -> float:
        """When the next beat is due (wall clock)."""
        if self.beat_offset is None:
            return last_due + self.interval
        now = time.time()
        k = (now - self.beat_offset) // self.interval + 1
        return k * self.interval + self.beat_offset

    async def _beat(self, call: grpc.aio.StreamStreamCall, quiet: asyncio.Event) -> None:
        beat = pb.SessionRequest(heartbeat=pb.SessionRequest.Beat())
        due = time.time()
        while not quiet.is_set():
            due = self._next_beat(due)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(quiet.wait(), max(0.0, due - time.time()))
            if quiet.is_set():
                return
            self._sent = (time.time(), due, time.perf_counter())
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
                ok = msg.heartbeat.status == pb.HEARTBEAT_STATUS_OK
                if self.on_heartbeat is not None and self._sent is not None:
                    sent_wall, due, t0 = self._sent
                    self.on_heartbeat(Beat(sent_wall, due, time.perf_counter() - t0, ok))
                if ok:
                    self.ready_until = msg.heartbeat.ready_until.ToDatetime()
                else:
                    self._on_status(msg.heartbeat.status)
            elif which == "left":
                return
            elif which == "reconnect":
                delay = msg.reconnect.delay_ms / 1000
                self.say(f"server is restarting; reconnecting in {delay:.2f}s")
                raise _Outcome("reconnect", delay=max(delay, 0.01))

    async def _leave_stream(
        self,
        call: grpc.aio.StreamStreamCall,
        reader: asyncio.Task[None] | None,
        reason: OfflineReason,
    ) -> None:
        leave = pb.SessionRequest(leave=pb.SessionRequest.Leave(reason=reason.to_pb()))
        try:
            await call.write(leave)
            if reader is None:
                reader = asyncio.create_task(self._read(call))
            await asyncio.wait_for(asyncio.shield(reader), LEAVE_TIMEOUT_S)
            self.left = True
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.done_writing()
            return
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError, _Outcome):
            pass
        # The stream broke while leaving: fall back to the unary Leave.
        self.left = await self.leave(reason)
