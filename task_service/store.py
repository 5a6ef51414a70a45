"""Storage for the `tasks` schema: a thin async layer over named queries. Every
status change is made inside `TaskTx.apply`, which declares the FSM trigger to the
database (which refuses anything else) in the same transaction."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from vigil.core.db import Database
from vigil.core.errors import AlreadyExists, FailedPrecondition, StorageError
from vigil.core.sql import load_queries
from vigil.task_service.model import Chatroom, Notification, Role, Task, Transition

Q = load_queries(Path(__file__).with_name("queries.sql"))
MIGRATIONS = Path(__file__).with_name("migrations")
ROLE_CHANNEL = "vigil_tasks"
NOTIFICATION_CHANNEL = "vigil_notifications"

_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)

# The UPDATE each trigger runs (fsm.py decides whether it may).
_TRIGGER_QUERY = {
    "claimTask": "claim_next",
    "startTask": "to_in_progress",
    "completeTask": "to_completed",
    "cancelTask": "to_closed",
    "promoteNextTask": "to_pending_promoted",
    "recoverStuckAcknowledged": "to_pending_recovered",
    "recoverOrphaned": "to_pending_recovered",
}


class TaskTx:
    """One transaction's worth of task operations."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.woken_roles: set[tuple[str, str]] = set()  # roles with a new pending task
        self.woken_machines: set[str] = set()  # machines with a new command
        self.notifications: list[Notification] = []

    async def lock_role(self, chatroom: str, role: str) -> Role | None:
        row = await self.conn.fetchrow(Q["lock_role"], chatroom, role)
        return _role(row) if row else None

    async def role_has_active(self, chatroom: str, role: str) -> bool:
        return bool(await self.conn.fetchval(Q["role_has_active"], chatroom, role))

    async def insert_task(
        self,
        chatroom: str,
        role: str,
        text: str,
        status: str,
        now: datetime,
        deadline_at: datetime | None,
    ) -> Task:
        row = await self.conn.fetchrow(
            Q["insert_task"], chatroom, role, text, status, now, deadline_at
        )
        if status == "pending":
            self.woken_roles.add((chatroom, role))
        return Task.from_row(row)

    async def lock_task(self, task_id: str) -> tuple[Task, str] | None:
        row = await self.conn.fetchrow(Q["lock_task"], task_id)
        return (Task.from_row(row), row["role_kind"]) if row else None

    async def apply(self, trigger: str, actor: str, reason: str, *args: Any) -> Task | None:
        """Declare `trigger` to the database and run its UPDATE (args follow the query's
        parameters). None when the UPDATE matched no row (claimTask with nothing pending)."""
        await self.conn.execute(Q["fsm_declare"], trigger, actor, reason)
        row = await self.conn.fetchrow(Q[_TRIGGER_QUERY[trigger]], *args)
        if row is None:
            return None
        task = Task.from_row(row)
        if task.status == "pending":
            self.woken_roles.add((task.chatroom, task.role))
        return task

    async def next_queued(self, chatroom: str, role: str) -> str | None:
        value = await self.conn.fetchval(Q["next_queued"], chatroom, role)
        return str(value) if value else None

    async def due(self, now: datetime, limit: int) -> list[tuple[Task, str]]:
        rows = await self.conn.fetch(Q["due_tasks"], now, limit)
        return [(Task.from_row(r), r["role_kind"]) for r in rows]

    async def set_deadline(self, task_id: str, deadline_at: datetime | None) -> None:
        await self.conn.execute(Q["set_deadline"], task_id, deadline_at)

    async def set_needs_attention(self, task_id: str, now: datetime) -> None:
        await self.conn.execute(Q["set_needs_attention"], task_id, now)

    async def mark_claimer_dead(self, task_id: str, now: datetime) -> None:
        await self.conn.execute(Q["mark_claimer_dead"], task_id, now)

    async def notify(
        self,
        kind: str,
        chatroom: str,
        role: str,
        task_id: str | None,
        attempt: int | None,
        message: str,
    ) -> Notification | None:
        row = await self.conn.fetchrow(
            Q["insert_notification"], kind, chatroom, role, task_id, attempt, message
        )
        if row is None:
            return None  # already told for this attempt
        n = Notification.from_row(row)
        await self.conn.execute(Q["notify_notification"], str(n.id))
        self.notifications.append(n)
        return n

    async def announce(self) -> None:
        for chatroom, role in self.woken_roles:
            await self.conn.execute(Q["notify_role"], f"{chatroom}/{role}")


def _role(row: Any) -> Role:
    return Role(row["role"], row["kind"], row["machine"], row["command"])


class TaskStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[TaskTx]:
        try:
            async with self.db.pool.acquire() as conn, conn.transaction():
                tx = TaskTx(conn)
                yield tx
                await tx.announce()
        except asyncpg.RaiseError as exc:
            # The FSM guard refused a status change (SQLSTATE VG001): a bug if it
            # happens, since fsm.transition checked first; never hide it as INTERNAL.
            raise FailedPrecondition(f"refused by the database: {exc}") from exc
        except asyncpg.UniqueViolationError as exc:
            raise AlreadyExists(str(exc)) from exc
        except _DB_ERRORS as exc:
            raise StorageError(f"database error: {exc}") from exc

    async def create_chatroom(self, name: str, roles: list[Role]) -> Chatroom:
        async with self.tx() as tx:
            row = await tx.conn.fetchrow(Q["insert_chatroom"], name)
            if row is None:
                raise AlreadyExists(f"chatroom {name!r} already exists")
            for r in roles:
                await tx.conn.execute(Q["insert_role"], name, r.role, r.kind, r.machine, r.command)
                if r.kind == "remote":
                    await tx.conn.execute(Q["insert_agent"], name, r.role, r.machine)
            return Chatroom(name, tuple(roles), row["created_at"])

    async def chatrooms(self, names: list[str] | None) -> list[Chatroom]:
        try:
            async with self.db.pool.acquire() as conn:
                if names is None:
                    rows = await conn.fetch(Q["list_chatrooms"])
                else:
                    rows = [r for n in names if (r := await conn.fetchrow(Q["get_chatroom"], n))]
                roles = await conn.fetch(Q["roles_of"], [r["chatroom"] for r in rows])
        except _DB_ERRORS as exc:
            raise StorageError(f"database error: {exc}") from exc
        by_room: dict[str, list[Role]] = {}
        for r in roles:
            by_room.setdefault(r["chatroom"], []).append(_role(r))
        return [
            Chatroom(r["chatroom"], tuple(by_room.get(r["chatroom"], [])), r["created_at"])
            for r in rows
        ]

    async def get_task(self, task_id: str) -> Task | None:
        row = await self.db.fetchrow(Q["get_task"], task_id)
        return Task.from_row(row) if row else None

    async def history(self, task_id: str) -> list[Transition]:
        rows = await self.db.fetch(Q["history"], task_id)
        return [
            Transition(
                r["from_status"],
                r["to_status"],
                r["trigger"],
                r["actor"],
                r["reason"],
                r["attempt"],
                r["at"],
            )
            for r in rows
        ]

    async def list_tasks(self, chatroom: str | None, status: str | None, limit: int) -> list[Task]:
        rows = await self.db.fetch(Q["list_tasks"], chatroom, status, limit)
        return [Task.from_row(r) for r in rows]

    async def list_notifications(self, after_id: int, limit: int) -> list[Notification]:
        rows = await self.db.fetch(Q["list_notifications"], after_id, limit)
        return [Notification.from_row(r) for r in rows]

    async def next_deadline(self) -> datetime | None:
        value: datetime | None = await self.db.fetchval(Q["next_deadline"])
        return value

    async def claims_of(self, connection_id: str, epoch: int) -> list[str]:
        rows = await self.db.fetch(Q["claims_of"], connection_id, epoch)
        return [str(r["id"]) for r in rows]

    async def mark_delivered(self, connection_id: str, epoch: int, now: datetime) -> None:
        await self.db.fetchval(Q["mark_delivered"], connection_id, epoch, now)

    async def oldest_overdue(self, now: datetime) -> float:
        return float(await self.db.fetchval(Q["oldest_overdue"], now))

    async def counts(self) -> tuple[dict[str, int], int]:
        rows = await self.db.fetch(Q["count_by_status"])
        attention = await self.db.fetchval(Q["count_needs_attention"])
        return {r["status"]: r["n"] for r in rows}, int(attention)
