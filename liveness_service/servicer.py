"""gRPC adapter of the liveness service: decode, call `Liveness`, encode."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from vigil.core import paging
from vigil.core.auth import Authenticator
from vigil.core.auth.rules import visible_chatroom
from vigil.core.errors import FailedPrecondition, InvalidArgument
from vigil.core.rpc import caller, rpc
from vigil.core.timefmt import to_proto
from vigil.core.vocab import AgentKind, OfflineReason
from vigil.liveness_service import codec
from vigil.liveness_service.service import OK, Liveness, Push
from vigil.liveness_service.service import Session as LiveSession
from vigil.v1 import liveness_pb2 as pb
from vigil.v1 import liveness_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Liveness"].full_name
WRITER_GRACE_S = 0.5  # longest an ending stream waits for a write in flight


def _kind(value: int) -> AgentKind:
    try:
        return AgentKind.from_pb(value)
    except ValueError:
        raise InvalidArgument("kind must be remote or custom") from None


def _reason(value: int) -> OfflineReason:
    try:
        return OfflineReason.from_pb(value)
    except ValueError:
        raise InvalidArgument(
            "a leave needs a reason: left, task_received, signal or error"
        ) from None


def _push_to_pb(push: Push, live: Liveness) -> pb.SessionResponse:
    if push.kind == "joined":
        assert push.participant is not None
        return pb.SessionResponse(
            joined=pb.JoinResponse(
                participant=codec.participant(push.participant),
                heartbeat_interval_ms=live.timings.heartbeat_interval_ms,
                ttl_ms=live.timings.heartbeat_ttl_ms,
            )
        )
    if push.kind == "heartbeat":
        return pb.SessionResponse(
            heartbeat=pb.HeartbeatResponse(
                status=push.status.to_pb(), ready_until=to_proto(push.ready_until)
            )
        )
    if push.kind == "left":
        assert push.participant is not None
        return pb.SessionResponse(
            left=pb.LeaveResponse(participant=codec.participant(push.participant))
        )
    return pb.SessionResponse(reconnect=pb.SessionResponse.Reconnect(delay_ms=push.delay_ms))


class LivenessServicer(pb_grpc.LivenessServicer):
    service_name = SERVICE_NAME

    def __init__(self, live: Liveness, auth: Authenticator) -> None:
        self.live = live
        self.auth = auth

    @rpc
    async def Join(
        self, request: pb.JoinRequest, context: grpc.aio.ServicerContext
    ) -> pb.JoinResponse:
        p = await self.live.join(
            request.chatroom, request.role, _kind(request.kind), request.connection_id, caller()
        )
        return pb.JoinResponse(
            participant=codec.participant(p),
            heartbeat_interval_ms=self.live.timings.heartbeat_interval_ms,
            ttl_ms=self.live.timings.heartbeat_ttl_ms,
        )

    @rpc
    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatResponse:
        status, ready_until = await self.live.beat_unary(
            request.chatroom, request.role, request.epoch, request.connection_id, caller()
        )
        return pb.HeartbeatResponse(status=status.to_pb(), ready_until=to_proto(ready_until))

    @rpc
    async def Leave(
        self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaveResponse:
        p = await self.live.leave(
            request.chatroom,
            request.role,
            request.epoch,
            request.connection_id,
            _reason(request.reason),
            caller(),
        )
        return pb.LeaveResponse(participant=codec.participant(p))

    @rpc
    async def ListParticipants(
        self, request: pb.ListParticipantsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListParticipantsResponse:
        chatroom = visible_chatroom(caller(), request.chatroom) or ""
        page = paging.page("participants", request.page_size, request.page_token)
        parts, revision = await self.live.list_participants(chatroom, request.live_only, page)
        shown, token = paging.split(parts, page, lambda p: (p.chatroom, p.role))
        return pb.ListParticipantsResponse(
            participants=[codec.participant(p) for p in shown],
            revision=revision,
            next_page_token=token,
        )

    @rpc
    async def WatchParticipants(
        self, request: pb.WatchParticipantsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PresenceEvent]:
        chatroom = visible_chatroom(caller(), request.chatroom) or ""
        async for ev in self.live.watch(request.from_revision, chatroom):
            yield codec.event(ev)

    @rpc
    async def Session(  # type: ignore[override]  # read/write style, not an iterator
        self, request_iterator: object, context: grpc.aio.ServicerContext
    ) -> None:
        """join|resume, then heartbeats, then a leave. Server pushes (superseded,
        rejoin, reconnect) go through the session's outbox, written by one writer.
        An error ends the stream with its status once the writer has stopped (one
        operation at a time on a call)."""
        session: LiveSession | None = None
        writer: asyncio.Task[None] | None = None
        self.live.metrics.streams.inc()
        try:
            session = await self._open(context)
            if session is None:
                return
            writer = asyncio.create_task(self._write_loop(session, context))
            await self._read_loop(session, context)
            await session.outbox.join()
        finally:
            self.live.metrics.streams.dec()
            if writer is not None:
                await self._stop_writer(session, writer)
            if session is not None:
                self.live.stream_ended(session)

    @staticmethod
    async def _stop_writer(session: LiveSession | None, writer: asyncio.Task[None]) -> None:
        """Let the writer finish the write it is in (a call takes one operation at a
        time: the status that ends the stream must not race a write), then stop it."""
        if session is not None and not writer.done():
            session.outbox.put_nowait(None)
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(writer), WRITER_GRACE_S)
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer

    async def _open(self, context: grpc.aio.ServicerContext) -> LiveSession | None:
        first = await context.read()
        if first is grpc.aio.EOF:
            return None
        self.live.check_accepting()
        which = first.WhichOneof("msg")
        if which == "join":
            j = first.join
            p = await self.live.join(j.chatroom, j.role, _kind(j.kind), j.connection_id, caller())
            session = self.live.open_session(p)
            session.outbox.put_nowait(Push("joined", participant=p))
            return session
        if which == "resume":
            r = first.resume
            status, resumed = await self.live.resume(
                r.chatroom, r.role, r.epoch, r.connection_id, caller()
            )
            if status != OK or resumed is None:
                # Told to rejoin (or that it was superseded). The client may already be
                # gone (a resume right before its process died): then the write fails
                # on a finished call and there is nobody left to tell.
                try:
                    await context.write(
                        pb.SessionResponse(heartbeat=pb.HeartbeatResponse(status=status.to_pb()))
                    )
                except Exception as exc:  # grpc raises its internal ExecuteBatchError here
                    log.debug("resume answer not delivered, the call is over: %r", exc)
                return None
            session = self.live.open_session(resumed)
            session.outbox.put_nowait(Push("joined", participant=resumed))
            return session
        if which in ("heartbeat", "leave"):
            raise FailedPrecondition(f"{which} before join: send join (or resume) first")
        raise InvalidArgument("the first Session message must be join or resume")

    async def _read_loop(self, session: LiveSession, context: grpc.aio.ServicerContext) -> None:
        while True:
            req = await context.read()
            if req is grpc.aio.EOF:
                return  # the client closed its side without a leave; `finally` decides
            which = req.WhichOneof("msg")
            if which == "heartbeat":
                push = await self.live.beat(session)
                session.outbox.put_nowait(push)
                if push.status != OK:
                    return
            elif which == "leave":
                p = await self.live.leave_session(session, _reason(req.leave.reason))
                session.outbox.put_nowait(Push("left", participant=p))
                return
            else:
                raise FailedPrecondition(
                    f"{which or 'an empty message'} on a session that already joined: "
                    "send heartbeat or leave"
                )

    async def _write_loop(self, session: LiveSession, context: grpc.aio.ServicerContext) -> None:
        while True:
            push = await session.outbox.get()
            try:
                if push is None:  # the stream is ending: nothing more to write
                    return
                await context.write(_push_to_pb(push, self.live))
            finally:
                session.outbox.task_done()
