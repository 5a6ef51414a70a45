"""Storage for the `liveness` schema. Every presence change is written with its
event, in one transaction, and announced to every replica with NOTIFY."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from vigil.core.db import Database, mapped_errors
from vigil.core.paging import Page
from vigil.core.sql import load_queries
from vigil.core.vocab import (
    MACHINES_CHATROOM,
    AgentKind,
    HeartbeatStatus,
    OfflineReason,
    ParticipantStatus,
    PresenceEventType,
)
from vigil.liveness_service.model import Participant, PresenceEvent

Q = load_queries(Path(__file__).with_name("queries.sql"))
MIGRATIONS = Path(__file__).with_name("migrations")
NOTIFY_CHANNEL = "vigil_liveness"

Beat = tuple[str, str, int, datetime, datetime]  # chatroom, role, epoch, ready_until, beat_at


class LivenessStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.heartbeat_statements = 0  # batched heartbeat writes issued (for metrics/bench)

    async def _record(
        self, conn: asyncpg.Connection, kind: PresenceEventType, rows: list[Any], at: datetime
    ) -> list[PresenceEvent]:
        """Give `rows` (participants as just written) revisions and events, then NOTIFY."""
        if not rows:
            return []
        last = await conn.fetchval(Q["bump_revision"], len(rows))
        first = last - len(rows) + 1
        revisions = list(range(first, last + 1))
        parts = [Participant.from_row(r) for r in rows]
        await conn.execute(
            Q["set_revisions"],
            [p.chatroom for p in parts],
            [p.role for p in parts],
            revisions,
        )
        await conn.execute(
            Q["insert_events"],
            revisions,
            [kind.value] * len(parts),
            [at] * len(parts),
            [p.chatroom for p in parts],
            [p.role for p in parts],
            [p.kind.value for p in parts],
            [p.status.value for p in parts],
            [p.epoch for p in parts],
            [p.connection_id for p in parts],
            [p.ready_until for p in parts],
            [p.joined_at for p in parts],
            [p.offline_at for p in parts],
            [p.offline_reason.value if p.offline_reason else None for p in parts],
            [p.principal for p in parts],
            [p.token_id for p in parts],
        )
        await conn.execute(Q["notify"], str(last))
        return [
            PresenceEvent(rev, kind, at, replace(p, revision=rev))
            for rev, p in zip(revisions, parts, strict=True)
        ]

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
        """A new participant with the next epoch, held by `principal`; returns it and the
        live one it superseded."""
        async with mapped_errors(), self.db.pool.acquire() as conn, conn.transaction():
            old = await conn.fetchrow(Q["lock_participant"], chatroom, role)
            superseded = None
            if old is not None and old["status"] == ParticipantStatus.LIVE:
                row = await conn.fetchrow(
                    Q["mark_offline"],
                    chatroom,
                    role,
                    old["epoch"],
                    old["connection_id"],
                    now,
                    OfflineReason.SUPERSEDED.value,
                    old["revision"],
                )
                (ev,) = await self._record(conn, PresenceEventType.OFFLINE, [row], now)
                superseded = ev.participant
            row = await conn.fetchrow(
                Q["upsert_joined"],
                chatroom,
                role,
                kind.value,
                connection_id,
                now,
                ready_until,
                0,
                principal,
                token_id,
            )
            (ev,) = await self._record(conn, PresenceEventType.JOINED, [row], now)
            return ev.participant, superseded

    async def _change_one(
        self, query: str, event: PresenceEventType, now: datetime, *args: object
    ) -> Participant | None:
        """Run a conditional single-row update; record its event when it matched."""
        async with mapped_errors(), self.db.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(Q[query], *args)
            if row is None:
                return None
            (ev,) = await self._record(conn, event, [row], now)
            return ev.participant

    async def mark_offline(
        self,
        chatroom: str,
        role: str,
        epoch: int,
        connection_id: str,
        now: datetime,
        reason: OfflineReason,
    ) -> Participant | None:
        """Offline if still live with that epoch and connection; None when it was not."""
        return await self._change_one(
            "mark_offline",
            PresenceEventType.OFFLINE,
            now,
            chatroom,
            role,
            epoch,
            connection_id,
            now,
            reason.value,
            0,
        )

    async def resume(
        self,
        chatroom: str,
        role: str,
        epoch: int,
        connection_id: str,
        now: datetime,
        ready_until: datetime,
    ) -> Participant | None:
        """The same participant on a new stream, if still live, same epoch and in time."""
        return await self._change_one(
            "resume",
            PresenceEventType.RESUMED,
            now,
            chatroom,
            role,
            epoch,
            connection_id,
            now,
            ready_until,
            0,
        )

    async def live_of_token(self, token_id: str) -> list[Participant]:
        return [Participant.from_row(r) for r in await self.db.fetch(Q["live_of_token"], token_id)]

    async def count_live_of_token(self, token_id: str) -> int:
        return int(await self.db.fetchval(Q["count_live_of_token"], token_id))

    async def get(self, chatroom: str, role: str) -> Participant | None:
        row = await self.db.fetchrow(Q["get_participant"], chatroom, role)
        return Participant.from_row(row) if row else None

    async def flush_heartbeats(
        self, beats: list[Beat]
    ) -> dict[tuple[str, str, int], HeartbeatStatus]:
        """Write many beats in one statement. Each (chatroom, role, epoch) maps to what
        the beat's participant is told: OK, SUPERSEDED (a newer epoch holds the role) or
        REJOIN_REQUIRED (it is no longer live)."""
        self.heartbeat_statements += 1
        rows = await self.db.fetch(
            Q["flush_heartbeats"],
            [b[0] for b in beats],
            [b[1] for b in beats],
            [b[2] for b in beats],
            [b[3] for b in beats],
            [b[4] for b in beats],
        )
        counted = {(r["chatroom"], r["role"], r["epoch"]) for r in rows}
        result = {(b[0], b[1], b[2]): HeartbeatStatus.OK for b in beats if b[:3] in counted}
        missed = [b for b in beats if b[:3] not in counted]
        if missed:
            # Superseded (a newer epoch holds the role) or merely no longer live?
            current = {
                (r["chatroom"], r["role"]): r["epoch"]
                for r in await self.db.fetch(
                    Q["current_epochs"], [b[0] for b in missed], [b[1] for b in missed]
                )
            }
            for chatroom, role, epoch, _until, _at in missed:
                newer = current.get((chatroom, role), 0) > epoch
                result[(chatroom, role, epoch)] = (
                    HeartbeatStatus.SUPERSEDED if newer else HeartbeatStatus.REJOIN_REQUIRED
                )
        return result

    async def next_deadline(self) -> datetime | None:
        value: datetime | None = await self.db.fetchval(Q["next_deadline"])
        return value

    async def expire_due(self, now: datetime, limit: int = 1000) -> list[Participant]:
        async with mapped_errors(), self.db.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(Q["expire_due"], now, limit)
            events = await self._record(conn, PresenceEventType.OFFLINE, list(rows), now)
            return [e.participant for e in events]

    async def list_participants(
        self, chatroom: str | None, live_only: bool, page: Page
    ) -> tuple[list[Participant], int]:
        """A page of participants and the revision it is consistent with."""
        async with (
            mapped_errors(),
            self.db.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            revision = await conn.fetchval(Q["current_revision"])
            rows = await conn.fetch(
                Q["list_participants"], chatroom, live_only, page.arg(0), page.arg(1), page.fetch
            )
        return [Participant.from_row(r) for r in rows], revision

    async def current_revision(self) -> int:
        value: int = await self.db.fetchval(Q["current_revision"])
        return value

    async def events_since(
        self, revision: int, chatroom: str | None = None, limit: int = 1000
    ) -> list[PresenceEvent]:
        rows = await self.db.fetch(Q["events_since"], revision, chatroom, limit)
        return [PresenceEvent.from_row(r) for r in rows]

    async def roles_live(
        self, offline_since: datetime, limit: int
    ) -> list[tuple[str, str, AgentKind, bool]]:
        rows = await self.db.fetch(Q["roles_live"], MACHINES_CHATROOM, offline_since, limit)
        return [(r["chatroom"], r["role"], AgentKind(r["kind"]), r["live"]) for r in rows]

    async def counts(self) -> list[tuple[AgentKind, ParticipantStatus, int]]:
        rows = await self.db.fetch(Q["count_by_kind_status"], MACHINES_CHATROOM)
        return [(AgentKind(r["kind"]), ParticipantStatus(r["status"]), r["n"]) for r in rows]
