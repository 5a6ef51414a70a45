"""Storage for the `tasks` schema: chatrooms, roles, tasks, their audit log and
notifications. A thin async layer over named queries, returning domain values.

Every status change is made inside `TaskTx.apply`, which declares the FSM trigger to
the database (which refuses anything else) in the same transaction. A transaction also
collects what must be announced after it commits: roles with a new pending task (their
waiting agents), machines with a new command (their daemons) and new notifications.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from vigil.core import validation
from vigil.core.auth.principal import SYSTEM
from vigil.core.batch import Batcher
from vigil.core.db import Constraints, Database, mapped_errors
from vigil.core.errors import AlreadyExists, NotFound
from vigil.core.paging import Page
from vigil.core.sql import load_queries
from vigil.core.vocab import AgentKind, NotificationKind, TaskStatus
from vigil.task_service.audit import AuditRow
from vigil.task_service.model import Chatroom, Notification, Role, Task, Transition

Q = load_queries(Path(__file__).with_name("queries.sql"))
MIGRATIONS = Path(__file__).with_name("migrations")
ROLE_CHANNEL = "vigil_tasks"
NOTIFICATION_CHANNEL = "vigil_notifications"
COMMAND_CHANNEL = "vigil_commands"

# Constraint violations and what they mean to a caller.
CONSTRAINTS: Constraints = {
    "roles_pkey": lambda exc: AlreadyExists("a role with that name already exists"),
    "tasks_chatroom_role_fkey": lambda exc: NotFound("no such chatroom and role"),
}

# The UPDATE each trigger runs (fsm.py decides whether it may).
_TRIGGER_QUERY = {
    "claimTask": "claim_next",
    "startTask": "to_in_progress",
    "completeTask": "to_completed",
    "cancelTask": "to_closed",
    "promoteNextTask": "to_pending_promoted",
    "recoverStuckAcknowledged": "to_pending_recovered",
    "recoverOrphaned": "to_pending_recovered",
    "releaseTask": "to_pending_released",
}


@dataclass
class Effects:
    """What a committed transaction must announce."""

    woken_roles: set[tuple[str, str]] = field(default_factory=set)  # a new pending task
    woken_machines: set[str] = field(default_factory=set)  # a new command
    notifications: list[Notification] = field(default_factory=list)
    # (the task after, trigger, actor, reason): each status change, logged once committed
    transitions: list[tuple[Task, str, str, str]] = field(default_factory=list)
    # (machine, chatroom, role, type, reason, requested_by) of each command issued
    commands: list[tuple[str, str, str, str, str, str]] = field(default_factory=list)


class Tx:
    """One transaction on the `tasks` schema; `effects` are announced after commit."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.effects = Effects()

    async def notify(
        self,
        kind: NotificationKind,
        chatroom: str,
        role: str,
        task_id: str | None,
        attempt: int | None,
        message: str,
        actor: str = SYSTEM,
        *,
        once_key: str | None = None,
    ) -> Notification | None:
        """Raise a notification: once per kind, task and attempt, or per kind and
        `once_key` (a command, a role's stop); `actor` is whose action caused it."""
        row = await self.conn.fetchrow(
            Q["insert_notification"],
            kind.value,
            chatroom,
            role,
            task_id,
            attempt,
            validation.truncate(message, validation.MAX_REASON),
            actor,
            once_key,
        )
        if row is None:
            return None  # already told for this attempt
        n = Notification.from_row(row)
        await self.conn.execute(Q["notify_notification"], str(n.id))
        self.effects.notifications.append(n)
        return n

    async def lock_role(self, chatroom: str, role: str) -> Role | None:
        """The role, locked: serializes the sends and promotions of one role."""
        row = await self.conn.fetchrow(Q["lock_role"], chatroom, role)
        return Role.from_row(row) if row else None

    async def lock_open_role(self, chatroom: str, role: str) -> Role | None:
        """As `lock_role`, if the role still takes tasks (None once removed or deleted)."""
        row = await self.conn.fetchrow(Q["lock_open_role"], chatroom, role)
        return Role.from_row(row) if row else None

    async def announce(self) -> None:
        for chatroom, role in self.effects.woken_roles:
            await self.conn.execute(Q["notify_role"], f"{chatroom}/{role}")


class TaskTx(Tx):
    async def role_has_active(self, chatroom: str, role: str) -> bool:
        return bool(await self.conn.fetchval(Q["role_has_active"], chatroom, role))

    async def insert_task(
        self,
        chatroom: str,
        role: str,
        text: str,
        status: TaskStatus,
        now: datetime,
        deadline_at: datetime | None,
        sent_by: str,
    ) -> Task:
        row = await self.conn.fetchrow(
            Q["insert_task"], chatroom, role, text, status.value, now, deadline_at, sent_by
        )
        if status == TaskStatus.PENDING:
            self.effects.woken_roles.add((chatroom, role))
        return Task.from_row(row)

    async def lock_task(self, task_id: str) -> tuple[Task, AgentKind] | None:
        row = await self.conn.fetchrow(Q["lock_task"], task_id)
        return (Task.from_row(row), AgentKind(row["role_kind"])) if row else None

    async def apply(self, trigger: str, actor: str, reason: str, *args: Any) -> Task | None:
        """Declare `trigger` to the database and run its UPDATE (args follow the query's
        parameters). None when the UPDATE matched no row (claimTask with nothing pending)."""
        await self.conn.execute(Q["fsm_declare"], trigger, actor, reason)
        row = await self.conn.fetchrow(Q[_TRIGGER_QUERY[trigger]], *args)
        if row is None:
            return None
        task = Task.from_row(row)
        if task.status == TaskStatus.PENDING:
            self.effects.woken_roles.add((task.chatroom, task.role))
        self.effects.transitions.append((task, trigger, actor, reason))
        return task

    async def delete_chatroom(self, chatroom: str, now: datetime) -> bool:
        """Mark the chatroom and its roles gone (lock them first: `lock_chatroom_roles`)."""
        return await self.conn.fetchrow(Q["delete_chatroom"], chatroom, now) is not None

    async def lock_chatroom_roles(self, chatroom: str) -> None:
        await self.conn.fetch(Q["lock_chatroom_roles"], chatroom)

    async def remove_role(self, chatroom: str, role: str, now: datetime) -> bool:
        return await self.conn.fetchrow(Q["remove_role"], chatroom, role, now) is not None

    async def open_tasks(self, chatroom: str, role: str | None = None) -> list[str]:
        """Tasks of a chatroom (or one role) not yet finished, oldest first."""
        return [str(r["id"]) for r in await self.conn.fetch(Q["role_open_tasks"], chatroom, role)]

    async def role_existed(self, chatroom: str, role: str) -> bool:
        """Whether (chatroom, role) was ever defined, removed or not."""
        return await self.conn.fetchrow(Q["any_role"], chatroom, role) is not None

    async def chatroom_deleted(self, chatroom: str) -> bool:
        return await self.conn.fetchrow(Q["chatroom_deleted"], chatroom) is not None

    async def claimed_by(self, connection_id: str, epoch: int) -> Task | None:
        """The task already claimed for this participant and not started, if any."""
        row = await self.conn.fetchrow(Q["claimed_by"], connection_id, epoch)
        return Task.from_row(row) if row else None

    async def next_queued(self, chatroom: str, role: str) -> str | None:
        value = await self.conn.fetchval(Q["next_queued"], chatroom, role)
        return str(value) if value else None

    async def due(self, now: datetime, limit: int) -> list[tuple[Task, AgentKind]]:
        rows = await self.conn.fetch(Q["due_tasks"], now, limit)
        return [(Task.from_row(r), AgentKind(r["role_kind"])) for r in rows]

    async def set_deadline(self, task_id: str, deadline_at: datetime | None) -> None:
        await self.conn.execute(Q["set_deadline"], task_id, deadline_at)

    async def set_needs_attention(self, task_id: str, now: datetime) -> None:
        await self.conn.execute(Q["set_needs_attention"], task_id, now)

    async def mark_claimer_dead(self, task_id: str, now: datetime) -> None:
        await self.conn.execute(Q["mark_claimer_dead"], task_id, now)

    async def active_task_of_role(self, chatroom: str, role: str) -> str | None:
        """The role's claimed (acknowledged or in-progress) task, if any."""
        value = await self.conn.fetchval(Q["active_task_of_role"], chatroom, role)
        return str(value) if value else None

    async def insert_chatroom(self, name: str) -> datetime | None:
        """The new chatroom's creation time; None if it exists already."""
        row = await self.conn.fetchrow(Q["insert_chatroom"], name)
        return row["created_at"] if row else None

    async def insert_role(self, chatroom: str, role: Role) -> None:
        await self.conn.execute(
            Q["insert_role"],
            chatroom,
            role.role,
            role.kind.value,
            role.machine,
            role.harness,
            role.command,
        )


# (chatroom, role, text, now, pending deadline, sent_by, request id): one send
_Send = tuple[str, str, str, datetime, datetime | None, str, str | None]


class TaskStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        # Sends that arrive while others are in the database go together (0013).
        self._sends: Batcher[_Send, tuple[Task, bool] | None] = Batcher(
            self._send_many,
            self._send_one,
        )

    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[TaskTx]:
        async with (
            mapped_errors(CONSTRAINTS),
            self.db.pool.acquire() as conn,
            conn.transaction(),
        ):
            tx = TaskTx(conn)
            yield tx
            await tx.announce()

    async def chatrooms(self, names: list[str]) -> list[Chatroom]:
        async with mapped_errors(), self.db.pool.acquire() as conn:
            rows = [r for n in names if (r := await conn.fetchrow(Q["get_chatroom"], n))]
            return await self._with_roles(conn, rows)

    @staticmethod
    async def _with_roles(conn: asyncpg.Connection, rows: list[asyncpg.Record]) -> list[Chatroom]:
        roles = await conn.fetch(Q["roles_of"], [r["chatroom"] for r in rows])
        by_room: dict[str, list[Role]] = {}
        for r in roles:
            by_room.setdefault(r["chatroom"], []).append(Role.from_row(r))
        return [
            Chatroom(r["chatroom"], tuple(by_room.get(r["chatroom"], [])), r["created_at"])
            for r in rows
        ]

    async def role_takes_tasks(self, chatroom: str, role: str) -> bool:
        return await self.db.fetchrow(Q["role_takes_tasks"], chatroom, role) is not None

    async def get_task(self, task_id: str) -> Task | None:
        row = await self.db.fetchrow(Q["get_task"], task_id)
        return Task.from_row(row) if row else None

    async def history(self, task_id: str) -> list[Transition]:
        return [Transition.from_row(r) for r in await self.db.fetch(Q["history"], task_id)]

    # -- the hot paths, one call each (0009_fast_paths.sql) --------------------------

    async def _fast(self, query: str, *args: Any) -> list[Task]:
        return [Task.from_row(r) for r in await self.db.fetch(Q[query], *args)]

    async def send_fast(
        self,
        chatroom: str,
        role: str,
        text: str,
        now: datetime,
        pending_deadline: datetime | None,
        sent_by: str,
        request_id: str | None = None,
    ) -> tuple[Task, bool] | None:
        """A new task (pending, or queued behind the role's active one) and True; or,
        when this sender already sent with `request_id`, the task that send created
        (as it is now, whatever its chatroom, role and text) and False; None when the
        role does not exist or takes no tasks. Concurrent sends share one statement and
        one commit (a group commit, `vigil.core.batch`)."""
        return await self._sends.submit(
            (chatroom, role, text, now, pending_deadline, sent_by, request_id)
        )

    async def _send_one(self, send: _Send) -> tuple[Task, bool] | None:
        row = await self.db.fetchrow(Q["send_task_fast"], *send)
        return None if row is None else (Task.from_row(row), bool(row["created"]))

    async def _send_many(self, sends: list[_Send]) -> list[tuple[Task, bool] | None]:
        rows = await self.db.fetch(
            Q["send_tasks_fast"], *(list(c) for c in zip(*sends, strict=True))
        )
        out: list[tuple[Task, bool] | None] = [None] * len(sends)
        for row in rows:
            out[row["ord"] - 1] = (Task.from_row(row), bool(row["created"]))
        return out

    async def claim_fast(
        self,
        chatroom: str,
        role: str,
        connection_id: str,
        epoch: int,
        now: datetime,
        deadline: datetime | None,
        by: str,
        token_id: str | None,
        reason: str,
    ) -> Task | None:
        """The task claimed for this participant: the one it holds already, or the
        role's oldest pending one; None when there is none."""
        found = await self._fast(
            "claim_task_fast", chatroom, role, connection_id, epoch, now, deadline, by,
            token_id, reason,
        )  # fmt: skip
        return found[0] if found else None

    async def start_fast(
        self, task_id: str, attempt: int, token: str | None, scope: str | None, actor: str,
        now: datetime,
    ) -> Task | None:  # fmt: skip
        """Started, if the caller's claim, attempt and status allow it; else None (the
        general path then says why)."""
        found = await self._fast("start_task_fast", task_id, attempt, token, scope, actor, now)
        return found[0] if found else None

    async def complete_fast(
        self, task_id: str, attempt: int, token: str | None, scope: str | None, actor: str,
        now: datetime, pending_deadline: datetime | None,
    ) -> list[Task]:  # fmt: skip
        """[completed, promoted next task (if the role is idle now and one was queued)],
        or [] when the claim, attempt or status do not allow it."""
        return await self._fast(
            "complete_task_fast", task_id, attempt, token, scope, actor, now, pending_deadline
        )

    # -- a long-lived session's steps (0010_session_steps.sql) -------------------------

    async def take_fast(
        self, chatroom: str, role: str, connection_id: str, epoch: int, now: datetime,
        deadline: datetime | None, by: str, token_id: str | None, reason: str,
    ) -> list[Task]:  # fmt: skip
        """Claim and start for this participant in one transaction: [the claim (made
        now), the started task], or [the task it holds, started if it was not]; []
        when there is nothing to take."""
        return await self._fast(
            "take_task_fast", chatroom, role, connection_id, epoch, now, deadline, by,
            token_id, reason, True,
        )  # fmt: skip

    async def complete_and_claim_fast(
        self, task_id: str, attempt: int, token: str | None, scope: str | None, actor: str,
        now: datetime, pending_deadline: datetime | None, chatroom: str, role: str,
        connection_id: str, epoch: int, ack_deadline: datetime | None, reason: str,
        claim_token: str | None, start: bool, claim: bool,
    ) -> list[Task]:  # fmt: skip
        """[completed, promoted (pending), then what the claim took (`take_fast`'s
        rows)], or [] when the claim, attempt, status or role do not allow completing."""
        return await self._fast(
            "complete_and_claim_fast", task_id, attempt, token, scope, actor, now,
            pending_deadline, chatroom, role, connection_id, epoch, ack_deadline, reason,
            claim_token, start, claim,
        )  # fmt: skip

    async def list_chatrooms(self, only: str | None, page: Page) -> list[Chatroom]:
        async with mapped_errors(), self.db.pool.acquire() as conn:
            rows = await conn.fetch(Q["list_chatrooms"], only, page.arg(0), page.fetch)
            return await self._with_roles(conn, rows)

    async def list_tasks(
        self, chatroom: str | None, status: TaskStatus | None, page: Page
    ) -> list[Task]:
        rows = await self.db.fetch(
            Q["list_tasks"],
            chatroom,
            status.value if status else None,
            page.arg(0),
            page.arg(1),
            page.fetch,
        )
        return [Task.from_row(r) for r in rows]

    async def list_notifications(
        self, after_id: int, limit: int, chatroom: str | None = None
    ) -> list[Notification]:
        """Oldest first, after `after_id`."""
        rows = await self.db.fetch(Q["list_notifications"], after_id, limit, chatroom)
        return [Notification.from_row(r) for r in rows]

    async def newest_notifications(
        self, limit: int, chatroom: str | None, before_id: int | None
    ) -> list[Notification]:
        rows = await self.db.fetch(Q["newest_notifications"], limit, chatroom, before_id)
        return [Notification.from_row(r) for r in rows]

    async def audit_page(
        self, after: str | None, only: str | None, limit: int
    ) -> list[tuple[str, str, int, list[AuditRow]]]:
        """Tasks (id order, after `after`) with their audit rows, read in one snapshot so
        a task and its log agree."""
        async with (
            mapped_errors(),
            self.db.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            tasks = await conn.fetch(Q["audit_tasks"], after, only, limit)
            rows = await conn.fetch(Q["audit_rows"], [t["id"] for t in tasks])
        by_task: dict[str, list[AuditRow]] = {}
        for r in rows:
            by_task.setdefault(str(r["task_id"]), []).append(AuditRow.from_row(r))
        return [
            (str(t["id"]), t["status"], t["attempt"], by_task.get(str(t["id"]), [])) for t in tasks
        ]

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

    async def counts(self, chatroom: str | None = None) -> tuple[dict[TaskStatus, int], int]:
        """Tasks by status, and open tasks needing attention (of one chatroom, or all)."""
        rows = await self.db.fetch(Q["count_by_status"], chatroom)
        attention = await self.db.fetchval(Q["count_needs_attention"], chatroom)
        return {TaskStatus(r["status"]): r["n"] for r in rows}, int(attention)
