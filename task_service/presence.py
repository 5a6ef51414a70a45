"""What the task service knows of liveness: it follows the liveness service's
presence events (list, then a watch resumed from the last revision seen), keeps each
role's current participant in memory, and reports every participant going offline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from vigil.core.server import client_options
from vigil.core.timings import Timings
from vigil.v1 import liveness_pb2 as lpb
from vigil.v1 import liveness_pb2_grpc as lpb_grpc

log = logging.getLogger(__name__)

_REASON = {
    v: k.removeprefix("OFFLINE_REASON_").lower()
    for k, v in lpb.OfflineReason.items()
    if v != lpb.OFFLINE_REASON_UNSPECIFIED
}


@dataclass(frozen=True)
class Presence:
    chatroom: str
    role: str
    epoch: int
    connection_id: str
    live: bool
    offline_reason: str | None


def _presence(p: lpb.Participant) -> Presence:
    return Presence(
        p.chatroom,
        p.role,
        p.epoch,
        p.connection_id,
        p.status == lpb.PARTICIPANT_STATUS_LIVE,
        _REASON.get(p.offline_reason),
    )


class PresenceFollower:
    def __init__(
        self,
        liveness_addr: str,
        timings: Timings,
        on_offline: Callable[[Presence], Awaitable[None]],
        on_joined: Callable[[Presence], Awaitable[None]] | None = None,
    ) -> None:
        self._on_joined = on_joined
        self.addr = liveness_addr
        self._timings = timings
        self._on_offline = on_offline
        self.roles: dict[tuple[str, str], Presence] = {}
        self.revision = 0
        self.synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def role_is_live(self, chatroom: str, role: str) -> bool:
        p = self.roles.get((chatroom, role))
        return p is not None and p.live

    def claimer_state(self, chatroom: str, role: str, connection_id: str, epoch: int) -> str:
        """'live', 'received' (left with task_received), 'gone' (offline any other way,
        or replaced by a newer epoch) or 'unknown'."""
        p = self.roles.get((chatroom, role))
        if p is None:
            return "unknown"
        if p.epoch > epoch:
            return "gone"
        if p.epoch < epoch or p.connection_id != connection_id:
            return "unknown"
        if p.live:
            return "live"
        return "received" if p.offline_reason == "task_received" else "gone"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="presence-follower")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                async with grpc.aio.insecure_channel(
                    self.addr, options=client_options(self._timings)
                ) as ch:
                    stub = lpb_grpc.LivenessStub(ch)
                    if not self.synced.is_set():
                        listed = await stub.ListParticipants(lpb.ListParticipantsRequest())
                        for p in listed.participants:
                            self.roles[(p.chatroom, p.role)] = _presence(p)
                        self.revision = listed.revision
                        self.synced.set()
                    watch = stub.WatchParticipants(
                        lpb.WatchParticipantsRequest(from_revision=self.revision)
                    )
                    delay = 0.05
                    async for ev in watch:
                        await self._apply(ev)
            except grpc.aio.AioRpcError as exc:
                log.info(
                    "presence watch: %s; resuming from revision %d", exc.code().name, self.revision
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _apply(self, ev: lpb.PresenceEvent) -> None:
        p = _presence(ev.participant)
        current = self.roles.get((p.chatroom, p.role))
        if current is None or current.epoch <= p.epoch:
            self.roles[(p.chatroom, p.role)] = p
        self.revision = ev.revision
        try:
            if ev.type == lpb.PRESENCE_EVENT_TYPE_OFFLINE:
                await self._on_offline(p)
            elif ev.type == lpb.PRESENCE_EVENT_TYPE_JOINED and self._on_joined is not None:
                await self._on_joined(p)
        except Exception:
            log.exception("handling a presence event of %s/%s failed", p.chatroom, p.role)
