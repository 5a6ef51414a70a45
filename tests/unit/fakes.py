"""In-memory stand-ins for the I/O-shaped pieces, for unit tests of the logic around
them. They keep the same rules as the real stores (conditional updates, fencing by
epoch), so a test of the logic is a test of what it asks of the store."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import datetime

from vigil.core.errors import StorageError
from vigil.core.vocab import AgentKind, HeartbeatStatus, OfflineReason, ParticipantStatus
from vigil.liveness_service.model import Participant
from vigil.liveness_service.store import Beat


class FakeLivenessStore:
    """The liveness store's contract, in a dict. `down = True` makes every call fail
    as an unreachable database does."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Participant] = {}
        self.statements = 0
        self.down = False
        self.heartbeat_statements = 0

    def _call(self) -> None:
        if self.down:
            raise StorageError("the database is unavailable: connection refused")
        self.statements += 1

    async def join(
        self,
        chatroom: str,
        role: str,
        kind: AgentKind,
        connection_id: str,
        now: datetime,
        ready_until: datetime,
        principal: str = "",
        token_id: str | None = None,
    ) -> tuple[Participant, Participant | None]:
        self._call()
        old = self.rows.get((chatroom, role))
        superseded = None
        if old is not None and old.live:
            superseded = replace(
                old,
                status=ParticipantStatus.OFFLINE,
                offline_at=now,
                offline_reason=OfflineReason.SUPERSEDED,
            )
        p = Participant(
            chatroom,
            role,
            kind,
            ParticipantStatus.LIVE,
            (old.epoch + 1) if old else 1,
            connection_id,
            ready_until,
            now,
            None,
            None,
            0,
            principal,
            token_id,
        )
        self.rows[(chatroom, role)] = p
        return p, superseded

    async def get(self, chatroom: str, role: str) -> Participant | None:
        self._call()
        return self.rows.get((chatroom, role))

    async def mark_offline(
        self,
        chatroom: str,
        role: str,
        epoch: int,
        connection_id: str,
        now: datetime,
        reason: OfflineReason,
    ) -> Participant | None:
        self._call()
        p = self.rows.get((chatroom, role))
        if p is None or not p.live or p.epoch != epoch or p.connection_id != connection_id:
            return None
        p = replace(p, status=ParticipantStatus.OFFLINE, offline_at=now, offline_reason=reason)
        self.rows[(chatroom, role)] = p
        return p

    async def resume(
        self,
        chatroom: str,
        role: str,
        epoch: int,
        connection_id: str,
        now: datetime,
        ready_until: datetime,
    ) -> Participant | None:
        self._call()
        p = self.rows.get((chatroom, role))
        if p is None or not p.live or p.epoch != epoch or p.connection_id != connection_id:
            return None
        if p.ready_until is None or p.ready_until <= now:
            return None
        p = replace(p, ready_until=ready_until)
        self.rows[(chatroom, role)] = p
        return p

    async def flush_heartbeats(
        self, beats: list[Beat]
    ) -> dict[tuple[str, str, int], HeartbeatStatus]:
        self._call()
        self.heartbeat_statements += 1
        out: dict[tuple[str, str, int], HeartbeatStatus] = {}
        for chatroom, role, epoch, ready_until, _beat_at in beats:
            p = self.rows.get((chatroom, role))
            if p is not None and p.live and p.epoch == epoch:
                assert p.ready_until is not None
                self.rows[(chatroom, role)] = replace(
                    p, ready_until=max(p.ready_until, ready_until)
                )
                out[(chatroom, role, epoch)] = HeartbeatStatus.OK
            elif p is not None and p.epoch > epoch:
                out[(chatroom, role, epoch)] = HeartbeatStatus.SUPERSEDED
            else:
                out[(chatroom, role, epoch)] = HeartbeatStatus.REJOIN_REQUIRED
        return out

    async def next_deadline(self) -> datetime | None:
        self._call()
        live = [p.ready_until for p in self.rows.values() if p.live and p.ready_until]
        return min(live) if live else None

    async def expire_due(self, now: datetime, limit: int = 1000) -> list[Participant]:
        self._call()
        due = sorted(
            (p for p in self.rows.values() if p.live and p.ready_until and p.ready_until <= now),
            key=lambda p: p.ready_until or now,
        )[:limit]
        out = []
        for p in due:
            gone = replace(
                p,
                status=ParticipantStatus.OFFLINE,
                offline_at=now,
                offline_reason=OfflineReason.TTL_EXPIRED,
            )
            self.rows[p.key] = gone
            out.append(gone)
        return out


def conn_id() -> str:
    return str(uuid.uuid4())
