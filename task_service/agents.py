"""Remote agents and their machines: registration and credentials, what daemons
report (exits, the children they still run), the commands they execute, and the
restart policy — deduplicated, backed off, and cut by a circuit breaker."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg

from vigil.core import validation
from vigil.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from vigil.task_service import policy
from vigil.task_service.store import Q, TaskTx

if TYPE_CHECKING:
    from vigil.task_service.service import TaskService

log = logging.getLogger(__name__)

MACHINES_CHATROOM = "vigil.machines"  # daemons' own presence: role = machine id
COMMAND_CHANNEL = "vigil_commands"
CLASSIFICATIONS = ("intentional", "signal", "exited_ok", "crashed", "daemon_lost")
UNEXPECTED = ("signal", "crashed", "daemon_lost")


@dataclass(frozen=True)
class ChildInfo:
    chatroom: str
    role: str
    pid: int
    started_at: datetime


@dataclass(frozen=True)
class ExitInfo:
    child: ChildInfo
    exit_code: int | None
    signal: int | None
    exited_at: datetime
    classification: str


_AGENT_FIELDS = (
    "status",
    "pid",
    "process_started_at",
    "next_restart_at",
    "circuit_opened_at",
    "half_open",
    "restart_count",
)


async def _update_agent(tx: TaskTx, agent: Any, **changes: Any) -> None:
    """Write an agent row: the given fields changed, the others as read (locked)."""
    assert set(changes) <= set(_AGENT_FIELDS), set(changes) - set(_AGENT_FIELDS)
    values = [changes[f] if f in changes else agent[f] for f in _AGENT_FIELDS]
    await tx.conn.execute(Q["update_agent"], agent["chatroom"], agent["role"], *values)


def _hash(credential: str) -> bytes:
    return hashlib.sha256(credential.encode()).digest()


class Agents:
    def __init__(self, svc: TaskService) -> None:
        self.svc = svc
        self.sessions: dict[str, set[asyncio.Event]] = {}  # machine -> waiting daemon sessions

    # -- machines ---------------------------------------------------------------

    async def register_machine(self, machine_id: str, hostname: str, harnesses: list[str]) -> str:
        validation.name(machine_id, "machine id")
        for h in harnesses:
            validation.name(h, "harness")
        credential = secrets.token_urlsafe(32)
        await self.svc.store.db.fetchrow(
            Q["upsert_machine"], machine_id, hostname[:255], harnesses, _hash(credential)
        )
        return credential

    async def authenticate(self, machine_id: str, credential: str) -> str:
        """The machine the credential belongs to; it must be `machine_id`."""
        if not credential:
            raise Unauthenticated("a machine credential is required (vigil machine register)")
        row = await self.svc.store.db.fetchrow(Q["machine_by_credential"], _hash(credential))
        if row is None:
            raise Unauthenticated("unknown machine credential; register the machine again")
        if machine_id and row["machine_id"] != machine_id:
            raise PermissionDenied(
                f"this credential belongs to machine {row['machine_id']!r}, not {machine_id!r}"
            )
        return str(row["machine_id"])

    async def list_machines(self) -> list[tuple[Any, bool]]:
        rows = await self.svc.store.db.fetch(Q["list_machines"])
        live = self.svc.presence.role_is_live
        return [(r, live(MACHINES_CHATROOM, r["machine_id"])) for r in rows]

    # -- commands ---------------------------------------------------------------

    def _wake(self, machine_id: str) -> None:
        for ev in self.sessions.get(machine_id, ()):
            ev.set()

    def woken(self, payload: str) -> None:
        if not payload:
            for events in self.sessions.values():
                for ev in events:
                    ev.set()
        else:
            self._wake(payload)

    async def open_commands(self, machine_id: str) -> list[Any]:
        return await self.svc.store.db.fetch(Q["open_commands_for"], machine_id)

    async def mark_command(
        self, machine_id: str, command_id: int, status: str, message: str | None = None
    ) -> Any:
        row = await self.svc.store.db.fetchrow(
            Q["mark_command"], command_id, status, self.svc.clock.now(), message, machine_id
        )
        if row is not None and status != "delivered":
            self.svc.metrics.commands.labels(row["type"], status).inc()
        return row

    async def request_restart(
        self,
        tx: TaskTx,
        chatroom: str,
        role: str,
        machine_id: str,
        reason: str,
        command: str | None,
    ) -> bool:
        """One stop+start pair per role at most (the database refuses a second); True
        when this call issued it."""
        deadline = self.svc.clock.now() + timedelta(
            milliseconds=self.svc.timings.command_deadline_ms
        )
        stop = await tx.conn.fetchval(
            Q["insert_command"], machine_id, chatroom, role, "stop", None, deadline, reason
        )
        start = await tx.conn.fetchval(
            Q["insert_command"], machine_id, chatroom, role, "start", command, deadline, reason
        )
        issued = stop is not None or start is not None
        self.svc.metrics.restart_requests.labels("issued" if issued else "deduplicated").inc()
        if issued:
            await tx.conn.execute(Q["notify_machine"], machine_id)
            tx.woken_machines.add(machine_id)
        return issued

    async def maybe_restart(
        self, tx: TaskTx, chatroom: str, role: str, reason: str, *, stuck: bool = False
    ) -> bool:
        """A task needs this remote role and nobody is live for it: restart its agent,
        unless a person stopped it, it is already starting, or it is backing off. An
        agent whose process runs is left alone (between two tasks it is briefly not
        live) unless `stuck`: it has not taken a pending task for the whole timeout."""
        agent = await tx.conn.fetchrow(Q["lock_agent"], chatroom, role)
        if agent is None or agent["desired_state"] != "running":
            return False
        if agent["status"] in ("starting", "backoff", "circuit_open") and not agent["half_open"]:
            return False
        if agent["status"] == "running" and not stuck:
            return False
        role_row = await tx.lock_role(chatroom, role)
        assert role_row is not None
        issued = await self.request_restart(
            tx, chatroom, role, agent["machine_id"], reason, role_row.command
        )
        if issued:
            await tx.notify(
                "restart_requested",
                chatroom,
                role,
                None,
                None,
                f"restart requested for remote role {chatroom}/{role}: {reason}",
            )
            await _update_agent(
                tx,
                agent,
                status="starting",
                next_restart_at=None,
                half_open=False,
                restart_count=agent["restart_count"] + 1,
            )
        return issued

    # -- what daemons report ---------------------------------------------------

    async def command_result(
        self,
        machine_id: str,
        command_id: int,
        outcome: str,
        child: ChildInfo | None,
        message: str,
    ) -> None:
        if outcome not in ("done", "failed", "expired"):
            raise InvalidArgument(f"outcome must be done, failed or expired, got {outcome!r}")
        row = await self.mark_command(machine_id, command_id, outcome, message or None)
        if row is None or row["type"] != "start":
            return
        if outcome != "done" or child is None:
            # Not started (expired or failed): the next need may issue a new start.
            await self.svc.store.db.fetchval(Q["start_not_done"], row["chatroom"], row["role"])
            return
        async with self.svc.store.tx() as tx:
            agent = await tx.conn.fetchrow(Q["lock_agent"], row["chatroom"], row["role"])
            if agent is None:
                return
            await _update_agent(
                tx,
                agent,
                status="running",
                pid=child.pid,
                process_started_at=child.started_at,
                next_restart_at=None,
            )

    async def reconcile(self, machine_id: str, children: Iterable[ChildInfo]) -> int:
        """The daemon's list of the children it still runs is the truth: any agent the
        backend thinks runs there and is not on the list exited (daemon_lost); any on
        the list is running. The backend never declares a pid dead on its own."""
        running = {(c.chatroom, c.role): c for c in children}
        lost: list[ExitInfo] = []
        now = self.svc.clock.now()
        async with self.svc.store.tx() as tx:
            for agent in await tx.conn.fetch(Q["agents_of_machine"], machine_id):
                key = (agent["chatroom"], agent["role"])
                child = running.get(key)
                if child is not None:
                    if agent["pid"] != child.pid or agent["status"] != "running":
                        await _update_agent(
                            tx,
                            agent,
                            status="running",
                            pid=child.pid,
                            process_started_at=child.started_at,
                            next_restart_at=None,
                        )
                elif agent["pid"] is not None:
                    info = ChildInfo(*key, agent["pid"], agent["process_started_at"] or now)
                    lost.append(ExitInfo(info, None, None, now, "daemon_lost"))
        for ex in lost:
            await self.report_exit(machine_id, ex)
        return len(lost)

    async def report_exit(self, machine_id: str, ex: ExitInfo) -> bool:
        """Record an exit once per incarnation and act on it; False for a duplicate."""
        c = ex.child
        if ex.classification not in CLASSIFICATIONS:
            raise InvalidArgument(
                "classification must be intentional, signal, exited_ok or crashed"
            )
        now = self.svc.clock.now()
        async with self.svc.store.tx() as tx:
            agent = await tx.conn.fetchrow(Q["lock_agent"], c.chatroom, c.role)
            if agent is None:
                raise NotFound(f"no remote agent {c.chatroom}/{c.role}")
            if agent["machine_id"] != machine_id:
                raise PermissionDenied(
                    f"{c.chatroom}/{c.role} runs on machine {agent['machine_id']!r}, "
                    f"not {machine_id!r}"
                )
            try:
                row = await tx.conn.fetchrow(
                    Q["insert_exit"],
                    machine_id,
                    c.chatroom,
                    c.role,
                    c.pid,
                    c.started_at,
                    ex.exit_code,
                    ex.signal,
                    ex.classification,
                    ex.exited_at,
                )
            except asyncpg.CheckViolationError as exc:
                raise InvalidArgument(str(exc)) from exc
            if row is None:
                return False
            self.svc.metrics.exits.labels(
                ex.classification,
                str(ex.exit_code if ex.exit_code is not None else ""),
                str(ex.signal or ""),
            ).inc()
            self.svc.metrics.exit_report_latency.observe(
                max(0.0, (now - ex.exited_at).total_seconds())
            )
            await tx.conn.execute(
                Q["record_last_exit"],
                c.chatroom,
                c.role,
                ex.exit_code,
                ex.signal,
                ex.classification,
                ex.exited_at,
            )
            current = agent["pid"] in (None, c.pid)
            if not current:
                return True  # an older incarnation: the agent runs on under a new pid
            status, next_restart, opened, half = "stopped", None, agent["circuit_opened_at"], False
            if ex.classification in UNEXPECTED:
                status = "crashed"
                if agent["desired_state"] == "running":
                    status, next_restart, opened = await self._after_crash(tx, agent, now)
            await _update_agent(
                tx,
                agent,
                status=status,
                pid=None,
                process_started_at=None,
                next_restart_at=next_restart,
                circuit_opened_at=opened,
                half_open=half,
            )
            task_id = await tx.conn.fetchval(Q["active_task_of_role"], c.chatroom, c.role)
        if task_id is not None:
            await self.svc.claimer_gone(
                str(task_id), f"its agent process {c.pid} exited ({ex.classification})"
            )
        if next_restart is not None:
            self.svc.poke(next_restart)
        return True

    async def _after_crash(
        self, tx: TaskTx, agent: Any, now: datetime
    ) -> tuple[str, datetime | None, datetime | None]:
        """Back off, or open the circuit: (status, next_restart_at, circuit_opened_at)."""
        since = max(
            now - timedelta(milliseconds=self.svc.timings.circuit_window_ms),
            agent["circuit_reset_at"] or datetime.min.replace(tzinfo=now.tzinfo),
        )
        exits = [
            r["exited_at"]
            for r in await tx.conn.fetch(
                Q["unexpected_exits"], agent["chatroom"], agent["role"], since
            )
        ]
        state = policy.circuit_state(exits, now, agent["circuit_opened_at"], self.svc.timings)
        if state == "open":
            opened = agent["circuit_opened_at"]
            if opened is None or now >= opened + timedelta(
                milliseconds=self.svc.timings.circuit_cooldown_ms
            ):
                opened = now  # (re)opened now: the half-open attempt crashed too
                await tx.notify(
                    "circuit_open",
                    agent["chatroom"],
                    agent["role"],
                    None,
                    None,
                    f"agent {agent['chatroom']}/{agent['role']} crashed {len(exits)} times "
                    f"in {self.svc.timings.circuit_window_ms // 1000}s: circuit open, no "
                    f"restart for {self.svc.timings.circuit_cooldown_ms // 1000}s",
                )
            cooldown_end = opened + timedelta(milliseconds=self.svc.timings.circuit_cooldown_ms)
            return "circuit_open", cooldown_end, opened
        delay = policy.restart_delay(len(exits), self.svc.timings)
        return "backoff", now + timedelta(seconds=delay), None

    async def run_due_restarts(self, now: datetime) -> None:
        async with self.svc.store.tx() as tx:
            for agent in await tx.conn.fetch(Q["due_restarts"], now):
                key = (agent["chatroom"], agent["role"])
                half = agent["status"] == "circuit_open"
                await _update_agent(tx, agent, next_restart_at=None, half_open=half)
                if agent["desired_state"] != "running":
                    continue
                role = await tx.lock_role(*key)
                assert role is not None
                issued = await self.request_restart(
                    tx,
                    *key,
                    agent["machine_id"],
                    "half-open attempt after the cool-down" if half else "restart after backoff",
                    role.command,
                )
                if issued:
                    await _update_agent(
                        tx,
                        agent,
                        status="starting",
                        next_restart_at=None,
                        half_open=half,
                        restart_count=agent["restart_count"] + 1,
                    )
        self.svc.after_commit(tx)

    async def next_restart(self) -> datetime | None:
        value: datetime | None = await self.svc.store.db.fetchval(Q["next_restart"])
        return value

    async def clean_join(self, chatroom: str, role: str) -> None:
        await self.svc.store.db.fetchval(Q["reset_circuit"], chatroom, role, self.svc.clock.now())

    async def refresh_metrics(self) -> None:
        m = self.svc.metrics
        for row in await self.svc.store.db.fetch(Q["circuit_states"]):
            m.circuit_open.labels(row["chatroom"], row["role"]).set(1 if row["open"] else 0)
        m.machines.set(await self.svc.store.db.fetchval(Q["count_machines"]))
        if self.svc.presence.synced.is_set():
            online = sum(
                1
                for (chatroom, _role), p in self.svc.presence.roles.items()
                if chatroom == MACHINES_CHATROOM and p.live
            )
            m.daemons_online.set(online)

    # -- a person's wishes -------------------------------------------------------

    async def set_desired(self, chatroom: str, role: str, desired: str) -> Any:
        validation.name(chatroom, "chatroom")
        validation.name(role, "role")
        async with self.svc.store.tx() as tx:
            agent = await tx.conn.fetchrow(Q["lock_agent"], chatroom, role)
            if agent is None:
                await self.svc.get_chatroom(chatroom)  # NOT_FOUND for the chatroom first
                raise FailedPrecondition(
                    f"{chatroom}/{role} is not a remote role: custom agents are run by people"
                )
            await tx.conn.execute(Q["set_agent_desired"], chatroom, role, desired)
            role_row = await tx.lock_role(chatroom, role)
            assert role_row is not None
            deadline = self.svc.clock.now() + timedelta(
                milliseconds=self.svc.timings.command_deadline_ms
            )
            if desired == "stopped":
                await tx.conn.fetchval(
                    Q["insert_command"],
                    agent["machine_id"],
                    chatroom,
                    role,
                    "stop",
                    None,
                    deadline,
                    "stopped by a person",
                )
                await _update_agent(
                    tx, agent, next_restart_at=None, circuit_opened_at=None, half_open=False
                )
            else:
                await tx.conn.fetchval(
                    Q["insert_command"],
                    agent["machine_id"],
                    chatroom,
                    role,
                    "start",
                    role_row.command,
                    deadline,
                    "started by a person",
                )
                await _update_agent(
                    tx,
                    agent,
                    status="starting",
                    next_restart_at=None,
                    circuit_opened_at=None,
                    half_open=False,
                )
            await tx.conn.execute(Q["notify_machine"], agent["machine_id"])
            tx.woken_machines.add(agent["machine_id"])
        self.svc.after_commit(tx)
        return await self.svc.store.db.fetchrow(Q["get_agent"], chatroom, role)

    async def list_agents(self, chatroom: str) -> list[Any]:
        if chatroom:
            validation.name(chatroom, "chatroom")
        return await self.svc.store.db.fetch(Q["list_agents"], chatroom or None)

    async def list_commands(self, machine_id: str, limit: int) -> list[Any]:
        if machine_id:
            validation.name(machine_id, "machine id")
        if limit < 0 or limit > 10_000:
            raise InvalidArgument("limit must be between 0 and 10000")
        return await self.svc.store.db.fetch(Q["list_commands"], machine_id or None, limit or 100)
