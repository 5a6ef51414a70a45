"""What the task service knows of liveness: it follows the liveness service's
presence events through its API (list, then a watch resumed from the last revision
seen), keeps each role's current participant in memory, and reports every participant
joining or going offline."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Literal

from vigil.client import Client, ClientConfig, RPCError
from vigil.core.aio import cancel_and_wait
from vigil.core.vocab import OfflineReason, ParticipantStatus, PresenceEventType
from vigil.v1 import liveness_pb2 as lpb

log = logging.getLogger(__name__)

ClaimerState = Literal["live", "received", "gone", "unknown"]


@dataclass(frozen=True)
class Presence:
    chatroom: str
    role: str
    epoch: int
    connection_id: str
    live: bool
    offline_reason: OfflineReason | None
    principal: str = ""  # who holds it
    token_id: str | None = None  # the credential it was joined with


def _presence(p: lpb.Participant) -> Presence:
    return Presence(
        p.chatroom,
        p.role,
        p.epoch,
        p.connection_id,
        p.status == ParticipantStatus.LIVE.to_pb(),
        OfflineReason.from_pb(p.offline_reason) if p.offline_reason else None,
        p.principal,
        p.token_id or None,
    )


class PresenceFollower:
    def __init__(
        self,
        config: ClientConfig,
        on_offline: Callable[[Presence], Awaitable[None]],
        on_joined: Callable[[Presence], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self._on_offline = on_offline
        self._on_joined = on_joined
        self.roles: dict[tuple[str, str], Presence] = {}
        self.revision = 0
        self.synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def follow(self, addr: str) -> None:
        """The liveness service to follow (known once a shared server bound its port)."""
        self.config = replace(self.config, liveness_addr=addr, tasks_addr=addr)

    def role_is_live(self, chatroom: str, role: str) -> bool:
        p = self.roles.get((chatroom, role))
        return p is not None and p.live

    def count_live(self, chatroom: str) -> int:
        return sum(1 for (room, _role), p in self.roles.items() if room == chatroom and p.live)

    def claimer_state(
        self, chatroom: str, role: str, connection_id: str, epoch: int
    ) -> ClaimerState:
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
        return "received" if p.offline_reason == OfflineReason.TASK_RECEIVED else "gone"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="presence-follower")

    async def stop(self) -> None:
        if self._task:
            await cancel_and_wait(self._task)

    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                async with Client(self.config) as client:
                    if not self.synced.is_set():
                        listed = await client.list_participants()
                        for p in listed.participants:
                            self.roles[(p.chatroom, p.role)] = _presence(p)
                        self.revision = listed.revision
                        self.synced.set()
                    delay = 0.05
                    async for ev in client.watch_participants(self.revision):
                        await self._apply(ev)
            except RPCError as exc:
                log.info("presence watch: %s; resuming from revision %d", exc, self.revision)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _apply(self, ev: lpb.PresenceEvent) -> None:
        p = _presence(ev.participant)
        current = self.roles.get((p.chatroom, p.role))
        if current is None or current.epoch <= p.epoch:
            self.roles[(p.chatroom, p.role)] = p
        self.revision = ev.revision
        try:
            if ev.type == PresenceEventType.OFFLINE.to_pb():
                await self._on_offline(p)
            elif ev.type == PresenceEventType.JOINED.to_pb() and self._on_joined is not None:
                await self._on_joined(p)
        except Exception:
            log.exception("handling a presence event of %s/%s failed", p.chatroom, p.role)
