"""Storage of the remote side of the `tasks` schema: machines and their credentials,
remote agents (desired state, status, pid, circuit), their exits, and the commands
daemons execute. Returns domain values (`task_service.model`).

`AgentTx` works inside a `TaskTx`, so a task and the restart it needs commit together.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

from vigil.core.auth.principal import SYSTEM
from vigil.core.db import Database
from vigil.core.paging import Page
from vigil.core.vocab import CommandStatus, CommandType, DesiredState
from vigil.task_service.model import (
    Agent,
    Child,
    Command,
    Exit,
    Machine,
    RecordedExit,
    Role,
)
from vigil.task_service.store import Q, TaskTx

# The agent fields `update_agent` writes (the others change through their own queries).
_AGENT_FIELDS = (
    "status",
    "pid",
    "process_started_at",
    "next_restart_at",
    "circuit_opened_at",
    "half_open",
    "restart_count",
    "status_reason",
)


class AgentTx:
    """Agent and command operations inside one task-service transaction."""

    def __init__(self, tx: TaskTx) -> None:
        self.tx = tx
        self.conn = tx.conn

    async def insert_agent(self, chatroom: str, role: str, machine_id: str) -> None:
        await self.conn.execute(Q["insert_agent"], chatroom, role, machine_id)

    async def lock_agent(self, chatroom: str, role: str) -> Agent | None:
        row = await self.conn.fetchrow(Q["lock_agent"], chatroom, role)
        return Agent.from_row(row) if row else None

    async def lock_agents_of(self, machine_id: str) -> list[Agent]:
        return [
            Agent.from_row(r) for r in await self.conn.fetch(Q["agents_of_machine"], machine_id)
        ]

    async def upsert_machine(self, machine_id: str, hostname: str, harnesses: list[str]) -> None:
        await self.conn.execute(Q["upsert_machine"], machine_id, hostname, harnesses)

    async def unregister_machine(self, machine_id: str, now: datetime) -> bool:
        return await self.conn.fetchrow(Q["unregister_machine"], machine_id, now) is not None

    async def stop_agents_of(self, machine_id: str) -> list[tuple[str, str]]:
        rows = await self.conn.fetch(Q["machine_agents_stopped"], machine_id)
        return [(r["chatroom"], r["role"]) for r in rows]

    async def due_restarts(self, now: datetime) -> list[Agent]:
        return [Agent.from_row(r) for r in await self.conn.fetch(Q["due_restarts"], now)]

    async def update_agent(self, agent: Agent, **changes: Any) -> Agent:
        """Write the agent with `changes` applied to the (locked) row as read."""
        unknown = set(changes) - set(_AGENT_FIELDS)
        if unknown:
            raise ValueError(f"update_agent cannot change {sorted(unknown)}")
        # A reason belongs to the status that set it: a new status clears it.
        new = replace(agent, **{"status_reason": None, **changes})
        await self.conn.execute(
            Q["update_agent"],
            new.chatroom,
            new.role,
            new.status.value,
            new.pid,
            new.process_started_at,
            new.next_restart_at,
            new.circuit_opened_at,
            new.half_open,
            new.restart_count,
            new.status_reason,
        )
        return new

    async def set_desired(self, agent: Agent, desired: DesiredState) -> Agent:
        row = await self.conn.fetchrow(
            Q["set_agent_desired"], agent.chatroom, agent.role, desired.value
        )
        return Agent.from_row(row)

    async def insert_command(
        self,
        agent: Agent,
        type_: CommandType,
        role: Role | None,
        deadline_at: datetime,
        reason: str,
        requested_by: str = SYSTEM,
        *,
        stuck: bool = False,
    ) -> int | None:
        """A new open command (a start runs what `role` names); None when one of that
        type is open already (the database holds at most one per role and type)."""
        value = await self.conn.fetchval(
            Q["insert_command"],
            agent.machine_id,
            agent.chatroom,
            agent.role,
            type_.value,
            role.harness if role else None,
            role.command if role else None,
            deadline_at,
            reason,
            requested_by,
            stuck,
        )
        if value is not None:
            await self.conn.execute(Q["notify_machine"], agent.machine_id)
            self.tx.effects.woken_machines.add(agent.machine_id)
            self.tx.effects.commands.append(
                (agent.machine_id, agent.chatroom, agent.role, type_.value, reason, requested_by)
            )
        return int(value) if value is not None else None

    async def withdraw_starts(self, agent: Agent, now: datetime, message: str) -> list[int]:
        """Close the role's open start (failed, with `message`) and wake its daemon's
        session, which tells the daemon not to run it."""
        ids = [
            int(r["id"])
            for r in await self.conn.fetch(
                Q["withdraw_starts"], agent.chatroom, agent.role, now, message
            )
        ]
        if ids:
            await self.conn.execute(Q["notify_machine"], agent.machine_id)
            self.tx.effects.woken_machines.add(agent.machine_id)
        return ids

    async def stopped_as_stuck(self, agent: Agent, started_at: datetime) -> bool:
        """Whether the role's latest stop since `started_at` restarted it as stuck."""
        return bool(
            await self.conn.fetchval(Q["stopped_as_stuck"], agent.chatroom, agent.role, started_at)
        )

    async def insert_exit(self, machine_id: str, ex: Exit, failure: str | None) -> bool:
        """Record an exit once per incarnation (with why it counts as a failure, if it
        does); False if it was recorded already."""
        c = ex.child
        row = await self.conn.fetchrow(
            Q["insert_exit"],
            machine_id,
            c.chatroom,
            c.role,
            c.pid,
            c.started_at,
            ex.exit_code,
            ex.signal,
            ex.classification.value,
            ex.exited_at,
            failure,
        )
        if row is None:
            return False
        await self.conn.execute(
            Q["record_last_exit"],
            c.chatroom,
            c.role,
            ex.exit_code,
            ex.signal,
            ex.classification.value,
            ex.exited_at,
        )
        return True

    async def unexpected_exits_since(self, agent: Agent, since: datetime) -> list[datetime]:
        rows = await self.conn.fetch(Q["unexpected_exits"], agent.chatroom, agent.role, since)
        return [r["exited_at"] for r in rows]


class AgentStore:
    """Reads and single-statement writes outside a task transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def upsert_machine(self, machine_id: str, hostname: str, harnesses: list[str]) -> Machine:
        row = await self.db.fetchrow(Q["upsert_machine"], machine_id, hostname, harnesses)
        return Machine.from_row(row)

    async def get_machine(self, machine_id: str) -> Machine | None:
        row = await self.db.fetchrow(Q["get_machine"], machine_id)
        return Machine.from_row(row) if row else None

    async def list_machines(self, page: Page) -> list[Machine]:
        rows = await self.db.fetch(Q["list_machines"], page.arg(0), page.fetch)
        return [Machine.from_row(r) for r in rows]

    async def count_machines(self) -> int:
        return int(await self.db.fetchval(Q["count_machines"]))

    async def get_agent(self, chatroom: str, role: str) -> Agent | None:
        row = await self.db.fetchrow(Q["get_agent"], chatroom, role)
        return Agent.from_row(row) if row else None

    async def list_agents(self, chatroom: str | None, page: Page) -> list[Agent]:
        rows = await self.db.fetch(Q["list_agents"], chatroom, page.arg(0), page.arg(1), page.fetch)
        return [Agent.from_row(r) for r in rows]

    async def list_commands(self, machine_id: str | None, page: Page) -> list[Command]:
        rows = await self.db.fetch(Q["list_commands"], machine_id, page.arg(0), page.fetch)
        return [Command.from_row(r) for r in rows]

    async def closed_commands(self, machine_id: str, ids: list[int]) -> list[Command]:
        rows = await self.db.fetch(Q["closed_commands"], machine_id, ids)
        return [Command.from_row(r) for r in rows]

    async def open_commands(self, machine_id: str) -> list[Command]:
        rows = await self.db.fetch(Q["open_commands_for"], machine_id)
        return [Command.from_row(r) for r in rows]

    async def mark_command(
        self,
        machine_id: str,
        command_id: int,
        status: CommandStatus,
        now: datetime,
        message: str | None = None,
    ) -> Command | None:
        """Move an open command of this machine on; None if it was not open (or not its)."""
        row = await self.db.fetchrow(
            Q["mark_command"], command_id, status.value, now, message, machine_id
        )
        return Command.from_row(row) if row else None

    async def start_not_done(self, chatroom: str, role: str, reason: str) -> None:
        """A start that expired or failed: the agent shows `failed`, and why."""
        await self.db.execute(Q["start_not_done"], chatroom, role, reason)

    async def record_started(self, chatroom: str, role: str, child: Child) -> None:
        """The daemon runs `child` for the role now."""
        await self.db.fetchval(Q["record_started"], chatroom, role, child.pid, child.started_at)

    async def list_exits(
        self, chatroom: str | None, role: str | None, page: Page
    ) -> list[RecordedExit]:
        rows = await self.db.fetch(Q["list_exits"], chatroom, role, page.arg(0), page.fetch)
        return [RecordedExit.from_row(r) for r in rows]

    async def next_restart(self) -> datetime | None:
        value: datetime | None = await self.db.fetchval(Q["next_restart"])
        return value

    async def reset_circuit(self, chatroom: str, role: str, now: datetime) -> None:
        await self.db.fetchval(Q["reset_circuit"], chatroom, role, now)

    async def circuit_states(self) -> list[tuple[str, str, bool]]:
        rows = await self.db.fetch(Q["circuit_states"])
        return [(r["chatroom"], r["role"], r["open"]) for r in rows]
