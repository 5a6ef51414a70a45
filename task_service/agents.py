"""Remote agents and their machines: registration and credentials, what daemons report
(exits, the children they still run), the commands they execute, and the restart
policy — deduplicated by the database, backed off, and cut by a circuit breaker.

The unit's dependencies are explicit: its stores, the clock and timings, metrics, a
view of presence, and three callbacks into the task side — recover a claimed task whose
agent is gone, announce what a transaction produced, and wake the deadline scheduler.
The decisions themselves (backoff, circuit) are pure functions in `policy`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Protocol

from vigil.core import logs, validation
from vigil.core.auth.principal import Principal
from vigil.core.auth.store import AuthStore
from vigil.core.clock import Clock
from vigil.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from vigil.core.paging import Page
from vigil.core.timings import Timings
from vigil.core.vocab import (
    COMMAND_OUTCOMES,
    MACHINES_CHATROOM,
    AgentStatus,
    CommandStatus,
    CommandType,
    DesiredState,
    ExitClassification,
    NotificationKind,
    TokenKind,
)
from vigil.task_service import policy
from vigil.task_service.agents_store import AgentStore, AgentTx
from vigil.task_service.metrics import TaskMetrics
from vigil.task_service.model import (
    Agent,
    Child,
    Command,
    Exit,
    Machine,
    RecordedExit,
    Role,
)
from vigil.task_service.store import Effects, TaskStore, TaskTx

log = logging.getLogger(__name__)


def describe_exit(ex: Exit, machine_id: str | None) -> str:
    """Which process ended, how and where, for audit rows and notifications."""
    if ex.signal:
        how = f"killed by signal {ex.signal}"
    elif ex.exit_code is not None:
        how = f"exited with code {ex.exit_code}"
    else:
        how = "ended, its exit status unknown"
    where = f" on machine {machine_id}" if machine_id else ""
    return f"agent process {ex.child.pid}{where} {how} ({ex.classification})"


class PresenceView(Protocol):
    """What the unit needs to know of liveness."""

    def role_is_live(self, chatroom: str, role: str) -> bool: ...

    def count_live(self, chatroom: str) -> int: ...


class Agents:
    def __init__(
        self,
        tasks: TaskStore,
        store: AgentStore,
        clock: Clock,
        timings: Timings,
        metrics: TaskMetrics,
        presence: PresenceView,
        auth: AuthStore,
        *,
        on_agent_gone: Callable[[str, str], Awaitable[None]],
        on_revoked: Callable[[list[str]], None] = lambda ids: None,
        after_commit: Callable[[Effects], None],
        poke: Callable[[datetime | None], None],
    ) -> None:
        self.tasks = tasks
        self.store = store
        self.clock = clock
        self.timings = timings
        self.metrics = metrics
        self.presence = presence
        self.auth = auth
        self._revoked = on_revoked
        self._on_agent_gone = on_agent_gone
        self._after_commit = after_commit
        self._poke = poke
        self.sessions: dict[str, set[asyncio.Event]] = {}  # machine -> waiting daemon sessions

    def _deadline(self) -> datetime:
        return self.clock.now() + timedelta(milliseconds=self.timings.command_deadline_ms)

    def machine_online(self, machine_id: str) -> bool:
        return self.presence.role_is_live(MACHINES_CHATROOM, machine_id)

    def shown(self, agent: Agent) -> Agent:
        """The agent as people should see it: a start that waits for an offline machine
        says so (computed when read, from the machine's presence)."""
        if agent.status == AgentStatus.STARTING and not self.machine_online(agent.machine_id):
            return replace(
                agent,
                status=AgentStatus.WAITING_FOR_MACHINE,
                status_reason=f"machine {agent.machine_id} is offline: its daemon holds no "
                "presence; the start is delivered when it is back",
            )
        return agent

    async def _note_offline(self, tx: TaskTx, agent: Agent, command_id: int | None) -> None:
        """A command just issued for a machine whose daemon is away: say so, once."""
        if command_id is None or self.machine_online(agent.machine_id):
            return
        await tx.notify(
            NotificationKind.MACHINE_OFFLINE,
            agent.chatroom,
            agent.role,
            None,
            None,
            f"machine {agent.machine_id} is offline: the agent of {agent.chatroom}/"
            f"{agent.role} cannot start until its daemon is back",
            once_key=f"command:{command_id}",
        )

    async def machine_went_offline(self, machine_id: str) -> None:
        """Its daemon's presence ended: every command still waiting for it says so."""
        waiting = [
            c for c in await self.store.open_commands(machine_id) if c.type == CommandType.START
        ]
        if not waiting:
            return
        async with self.tasks.tx() as tx:
            for c in waiting:
                await tx.notify(
                    NotificationKind.MACHINE_OFFLINE,
                    c.chatroom,
                    c.role,
                    None,
                    None,
                    f"machine {machine_id} went offline with the start of {c.chatroom}/"
                    f"{c.role} not done: it waits until its daemon is back",
                    once_key=f"command:{c.id}",
                )
        self._after_commit(tx.effects)

    # -- machines ---------------------------------------------------------------

    async def register_machine(
        self, machine_id: str, hostname: str, harnesses: list[str], by: Principal
    ) -> str:
        """Register a machine, or rotate its credential: the old one stops working at
        once (its agents keep theirs). Returns the new credential (shown this once)."""
        validation.name(machine_id, "machine id")
        validation.text(
            hostname, "hostname", validation.MAX_HOSTNAME, required=False, one_line=True
        )
        if len(harnesses) > 64:
            raise InvalidArgument(f"a machine declares at most 64 harnesses, got {len(harnesses)}")
        for h in harnesses:
            validation.name(h, "harness")
        now = self.clock.now()
        async with self.tasks.tx() as tx:
            await AgentTx(tx).upsert_machine(machine_id, hostname, harnesses)
            old = await self.auth.revoke_machine_credential(
                machine_id, now, f"rotated by {by.display}", conn=tx.conn
            )
            _record, credential = await self.auth.create(
                TokenKind.MACHINE, machine_id, by.display, machine=machine_id, conn=tx.conn
            )
        self._revoked([t.id for t in old])
        return credential

    async def unregister_machine(
        self, machine_id: str, reason: str, by: Principal
    ) -> tuple[int, int]:
        """Forget a machine: its credential and its agents' credentials stop working at
        once, its agents show stopped, and the tasks they held are pending again.
        Returns (credentials revoked, tasks recovered)."""
        validation.name(machine_id, "machine id")
        validation.text(reason, "reason", validation.MAX_REASON, required=False)
        why = f"machine {machine_id} unregistered by {by.display}" + (
            f": {reason}" if reason else ""
        )
        now = self.clock.now()
        async with self.tasks.tx() as tx:
            atx = AgentTx(tx)
            if not await atx.unregister_machine(machine_id, now):
                raise NotFound(f"no registered machine {machine_id!r}")
            revoked = await self.auth.revoke_machine(machine_id, now, why, conn=tx.conn)
            roles = await atx.stop_agents_of(machine_id)
            held = [
                t for chatroom, role in roles if (t := await tx.active_task_of_role(chatroom, role))
            ]
        self._revoked([t.id for t in revoked])
        for task_id in held:
            await self._on_agent_gone(task_id, why)
        return len(revoked), len(held)

    async def list_machines(self, page: Page) -> list[tuple[Machine, bool]]:
        """A page of machines, each with whether its daemon is online (holds its
        presence)."""
        live = self.presence.role_is_live
        return [
            (m, live(MACHINES_CHATROOM, m.machine_id)) for m in await self.store.list_machines(page)
        ]

    # -- commands ---------------------------------------------------------------

    def woken(self, machine_id: str) -> None:
        """A machine has a new command (here or on another replica); '' wakes all."""
        targets = (
            self.sessions.values() if not machine_id else [self.sessions.get(machine_id, set())]
        )
        for events in targets:
            for ev in events:
                ev.set()

    async def open_commands(self, machine_id: str) -> list[Command]:
        return await self.store.open_commands(machine_id)

    async def closed_commands(self, machine_id: str, ids: list[int]) -> list[Command]:
        """Which of these commands (pushed to the daemon, open then) are closed now."""
        return await self.store.closed_commands(machine_id, ids) if ids else []

    async def mark_command(
        self, machine_id: str, command_id: int, status: CommandStatus, message: str | None = None
    ) -> Command | None:
        cmd = await self.store.mark_command(
            machine_id, command_id, status, self.clock.now(), message
        )
        if cmd is not None and status != CommandStatus.DELIVERED:
            self.metrics.commands.labels(cmd.type, status).inc()
        return cmd

    async def _request_restart(
        self, atx: AgentTx, agent: Agent, reason: str, role: Role, *, stuck: bool = False
    ) -> bool:
        """One stop+start pair per role at most (the database refuses a second); True
        when this call issued it. A `stuck` restart's stop counts as a failure of the
        process it stops (it never took work)."""
        deadline = self._deadline()
        stop = await atx.insert_command(
            agent, CommandType.STOP, None, deadline, reason, stuck=stuck
        )
        start = await atx.insert_command(agent, CommandType.START, role, deadline, reason)
        await self._note_offline(atx.tx, agent, start)
        issued = stop is not None or start is not None
        self.metrics.restart_requests.labels("issued" if issued else "deduplicated").inc()
        return issued

    async def maybe_restart(
        self, tx: TaskTx, chatroom: str, role: str, reason: str, *, stuck: bool = False
    ) -> bool:
        """A task needs this remote role and nobody is live for it: restart its agent,
        unless a person stopped it, it is already starting, or it is backing off. An
        agent whose process runs is left alone (between two tasks it is briefly not
        live) unless `stuck`: it has not taken a pending task for the whole timeout."""
        atx = AgentTx(tx)
        agent = await atx.lock_agent(chatroom, role)
        if agent is None:
            return False
        if agent.desired_state != DesiredState.RUNNING:
            await tx.notify(
                NotificationKind.ROLE_STOPPED,
                chatroom,
                role,
                None,
                None,
                f"tasks wait for remote role {chatroom}/{role}, which a person stopped; "
                f"`vigil agent start --chatroom {chatroom} --role {role}` runs it again",
                once_key=f"{chatroom}/{role}@{agent.desired_at}",  # once per stop
            )
            return False
        waiting = (AgentStatus.STARTING, AgentStatus.BACKOFF, AgentStatus.CIRCUIT_OPEN)
        if agent.status in waiting and not agent.half_open:
            return False
        if agent.status == AgentStatus.RUNNING and not stuck:
            return False
        role_row = await tx.lock_role(chatroom, role)
        assert role_row is not None
        if not await self._request_restart(atx, agent, reason, role_row, stuck=stuck):
            return False
        await tx.notify(
            NotificationKind.RESTART_REQUESTED,
            chatroom,
            role,
            None,
            None,
            f"restart requested for remote role {chatroom}/{role}: {reason}",
        )
        await atx.update_agent(
            agent,
            status=_restarting(agent),
            next_restart_at=None,
            half_open=False,
            restart_count=agent.restart_count + 1,
        )
        return True

    async def run_due_restarts(self, now: datetime) -> None:
        """Restart the agents whose backoff (or cool-down) ended."""
        async with self.tasks.tx() as tx:
            atx = AgentTx(tx)
            for agent in await atx.due_restarts(now):
                half = agent.status == AgentStatus.CIRCUIT_OPEN
                agent = await atx.update_agent(agent, next_restart_at=None, half_open=half)
                if agent.desired_state != DesiredState.RUNNING:
                    continue
                role = await tx.lock_role(agent.chatroom, agent.role)
                assert role is not None
                reason = (
                    "half-open attempt after the cool-down" if half else "restart after backoff"
                )
                if await self._request_restart(atx, agent, reason, role):
                    await atx.update_agent(
                        agent, status=_restarting(agent), restart_count=agent.restart_count + 1
                    )
        self._after_commit(tx.effects)

    async def next_restart(self) -> datetime | None:
        return await self.store.next_restart()

    # -- what daemons report ---------------------------------------------------

    async def command_result(
        self,
        machine_id: str,
        command_id: int,
        outcome: CommandStatus,
        child: Child | None,
        message: str,
    ) -> None:
        if outcome not in COMMAND_OUTCOMES:
            raise FailedPrecondition(f"a command ends done, failed or expired, not {outcome}")
        message = validation.truncate(message, validation.MAX_REASON)
        if outcome != CommandStatus.DONE and not message:
            message = f"the daemon reported {outcome} without a reason"
        cmd = await self.mark_command(machine_id, command_id, outcome, message or None)
        if cmd is None:
            return
        logs.event(
            log,
            "command_result",
            f"{cmd.type} of {cmd.chatroom}/{cmd.role} on machine {machine_id}: {outcome}",
            machine=machine_id,
            chatroom=cmd.chatroom,
            role=cmd.role,
            command_id=cmd.id,
            type=str(cmd.type),
            outcome=str(outcome),
            pid=child.pid if child else None,
            reason=message or None,
        )
        if outcome != CommandStatus.DONE:
            # Every start or stop that did not happen says why, where people look.
            async with self.tasks.tx() as tx:
                await tx.notify(
                    NotificationKind.COMMAND_FAILED,
                    cmd.chatroom,
                    cmd.role,
                    None,
                    None,
                    f"the {cmd.type} of {cmd.chatroom}/{cmd.role} on machine {machine_id} "
                    f"{outcome}: {message}",
                    f"machine:{machine_id}",
                    once_key=f"command:{cmd.id}",
                )
            self._after_commit(tx.effects)
        if cmd.type != CommandType.START:
            return
        if outcome == CommandStatus.DONE and child is not None:
            await self.store.record_started(cmd.chatroom, cmd.role, child)
            # The credential minted for this start now belongs to that process.
            await self.auth.bind_agent(command_id, child.pid, child.started_at)
            return
        # Not started (expired or failed): the agent says so; the next need may issue a
        # new start.
        await self.store.start_not_done(
            cmd.chatroom, cmd.role, f"its start {outcome} on machine {machine_id}: {message}"
        )
        revoked = await self.auth.revoke_agent_command(
            command_id, self.clock.now(), f"its start command {outcome}"
        )
        self._revoked([t.id for t in revoked])

    async def agent_credential(self, cmd: Command) -> str:
        """A fresh credential for the process a start command is about to start, scoped
        to its chatroom, role, machine and command (an earlier one minted for the same
        command and never used is revoked: it was handed over again)."""
        now = self.clock.now()
        stale = await self.auth.revoke_agent_command(cmd.id, now, "handed over again")
        self._revoked([t.id for t in stale])
        _record, secret = await self.auth.create(
            TokenKind.AGENT,
            f"{cmd.chatroom}/{cmd.role}",
            f"machine:{cmd.machine_id}",
            chatroom=cmd.chatroom,
            role=cmd.role,
            machine=cmd.machine_id,
            command_id=cmd.id,
        )
        return secret

    async def reconcile(self, machine_id: str, children: Iterable[Child]) -> int:
        """The daemon's list of the children it still runs is the truth: any agent the
        backend thinks runs there and is not on the list exited (daemon_lost); any on
        the list is running. The backend never declares a pid dead on its own."""
        running = {(c.chatroom, c.role): c for c in children}
        lost: list[Exit] = []
        now = self.clock.now()
        async with self.tasks.tx() as tx:
            atx = AgentTx(tx)
            for agent in await atx.lock_agents_of(machine_id):
                child = running.get(agent.key)
                if child is not None:
                    if agent.pid != child.pid or agent.status != AgentStatus.RUNNING:
                        await atx.update_agent(
                            agent,
                            status=AgentStatus.RUNNING,
                            pid=child.pid,
                            process_started_at=child.started_at,
                            next_restart_at=None,
                        )
                elif agent.pid is not None:
                    gone = Child(*agent.key, agent.pid, agent.process_started_at or now)
                    lost.append(Exit(gone, None, None, now, ExitClassification.DAEMON_LOST))
        for ex in lost:
            await self.report_exit(machine_id, ex)
        # Credentials of processes the daemon no longer runs die with them.
        revoked = await self.auth.revoke_agents_not_running(
            machine_id, [c.pid for c in running.values()], now, "its process is gone"
        )
        self._revoked([t.id for t in revoked])
        return len(lost)

    async def report_exit(self, machine_id: str, ex: Exit) -> bool:
        """Record an exit once per incarnation and act on it; False for a duplicate."""
        c = ex.child
        now = self.clock.now()
        async with self.tasks.tx() as tx:
            atx = AgentTx(tx)
            agent = await atx.lock_agent(c.chatroom, c.role)
            if agent is None:
                raise NotFound(f"no remote agent {c.chatroom}/{c.role}")
            if agent.machine_id != machine_id:
                raise PermissionDenied(
                    f"{c.chatroom}/{c.role} runs on machine {agent.machine_id!r}, "
                    f"not {machine_id!r}"
                )
            stuck = ex.classification == ExitClassification.INTENTIONAL and (
                await atx.stopped_as_stuck(agent, c.started_at)
            )
            uptime = (ex.exited_at - c.started_at).total_seconds()
            failure = policy.failure_of(ex.classification, uptime, stuck, self.timings)
            if not await atx.insert_exit(machine_id, ex, failure):
                return False
            self._count_exit(ex, now)
            # The process's credential dies with it (its open streams end at once).
            revoked = await self.auth.revoke_agent_process(
                machine_id, c.pid, c.started_at, now, f"its process exited ({ex.classification})",
                conn=tx.conn,
            )  # fmt: skip
            self._revoked([t.id for t in revoked])
            if agent.pid not in (None, c.pid):
                return True  # an older incarnation: the agent runs on under a new pid
            decision = await self._decide(tx, atx, agent, failure, now)
            await atx.update_agent(
                agent,
                status=decision.status,
                pid=None,
                process_started_at=None,
                next_restart_at=decision.next_restart_at,
                circuit_opened_at=decision.circuit_opened_at,
                half_open=False,
            )
            task_id = await tx.active_task_of_role(c.chatroom, c.role)
        self._after_commit(tx.effects)
        logs.event(
            log,
            "agent_exit",
            describe_exit(ex, machine_id),
            machine=machine_id,
            chatroom=c.chatroom,
            role=c.role,
            pid=c.pid,
            code=ex.exit_code,
            signal=ex.signal,
            classification=str(ex.classification),
            failure=failure,
            status=str(decision.status),
        )
        if decision.circuit_just_opened:
            logs.event(
                log,
                "circuit_opened",
                f"{c.chatroom}/{c.role}: restart circuit open",
                chatroom=c.chatroom,
                role=c.role,
                machine=machine_id,
                reason=failure,
            )
        if task_id is not None:
            await self._on_agent_gone(task_id, describe_exit(ex, agent.machine_id))
        if decision.next_restart_at is not None:
            self._poke(decision.next_restart_at)
        return True

    async def _decide(
        self, tx: TaskTx, atx: AgentTx, agent: Agent, failure: str | None, now: datetime
    ) -> policy.ExitDecision:
        """The agent's next state after this exit, and the notification if the circuit
        opened."""
        window_start = now - timedelta(milliseconds=self.timings.circuit_window_ms)
        since = max(window_start, agent.circuit_reset_at or window_start)
        exits = await atx.unexpected_exits_since(agent, since)
        decision = policy.after_exit(
            failure is not None,
            agent.desired_state,
            exits,
            agent.circuit_opened_at,
            now,
            self.timings,
        )
        if decision.circuit_just_opened:
            await tx.notify(
                NotificationKind.CIRCUIT_OPEN,
                agent.chatroom,
                agent.role,
                None,
                None,
                f"agent {agent.chatroom}/{agent.role} failed {len(exits)} times in "
                f"{self.timings.circuit_window_ms // 1000}s (the latest: {failure}): circuit "
                f"open, no restart for {self.timings.circuit_cooldown_ms // 1000}s",
            )
        return decision

    def _count_exit(self, ex: Exit, now: datetime) -> None:
        self.metrics.exits.labels(
            ex.classification,
            str(ex.exit_code) if ex.exit_code is not None else "none",
            str(ex.signal) if ex.signal else "none",
        ).inc()
        self.metrics.exit_report_latency.observe(max(0.0, (now - ex.exited_at).total_seconds()))

    async def clean_join(self, chatroom: str, role: str) -> None:
        """A clean join of the role closes its circuit."""
        await self.store.reset_circuit(chatroom, role, self.clock.now())

    async def refresh_metrics(self) -> None:
        states = await self.store.circuit_states()
        self.metrics.circuit_open.clear()  # roles that no longer exist leave no series
        for chatroom, role, open_ in states:
            self.metrics.circuit_open.labels(chatroom, role).set(1 if open_ else 0)
        self.metrics.machines.set(await self.store.count_machines())
        self.metrics.daemons_online.set(self.presence.count_live(MACHINES_CHATROOM))

    # -- a person's wishes -------------------------------------------------------

    async def set_desired(
        self, chatroom: str, role: str, desired: DesiredState, by: Principal
    ) -> Agent:
        """A person's wish, recorded with who they are: run the role's agent (start it
        now) or keep it stopped (stop it now)."""
        validation.name(chatroom, "chatroom")
        validation.name(role, "role")
        async with self.tasks.tx() as tx:
            atx = AgentTx(tx)
            agent = await atx.lock_agent(chatroom, role)
            if agent is None:
                if await tx.lock_role(chatroom, role) is None:
                    raise NotFound(f"no role {role!r} in chatroom {chatroom!r}")
                raise FailedPrecondition(
                    f"{chatroom}/{role} is not a remote role: custom agents are run by people"
                )
            agent = await atx.set_desired(agent, desired)
            role_row = await tx.lock_role(chatroom, role)
            assert role_row is not None
            if desired == DesiredState.STOPPED:
                await atx.insert_command(
                    agent, CommandType.STOP, None, self._deadline(), "stopped by a person",
                    by.display,
                )  # fmt: skip
                # A start still waiting its turn (behind the stop of a process that has
                # not exited yet) would undo this stop: it is withdrawn, and its daemon
                # told not to run it.
                withdrawn = await atx.withdraw_starts(
                    agent, self.clock.now(), f"withdrawn: {by.display} stopped the role first"
                )
                for command_id in withdrawn:
                    revoked = await self.auth.revoke_agent_command(
                        command_id, self.clock.now(), "its start was withdrawn", conn=tx.conn
                    )
                    self._revoked([t.id for t in revoked])
                agent = await atx.update_agent(
                    agent, next_restart_at=None, circuit_opened_at=None, half_open=False
                )
            else:
                start = await atx.insert_command(
                    agent,
                    CommandType.START,
                    role_row,
                    self._deadline(),
                    "started by a person",
                    by.display,
                )
                await self._note_offline(tx, agent, start)
                agent = await atx.update_agent(
                    agent,
                    status=_restarting(agent),
                    next_restart_at=None,
                    circuit_opened_at=None,
                    half_open=False,
                )
        self._after_commit(tx.effects)
        return self.shown(agent)

    async def list_agents(self, chatroom: str, page: Page) -> list[Agent]:
        if chatroom:
            validation.name(chatroom, "chatroom")
        return [self.shown(a) for a in await self.store.list_agents(chatroom or None, page)]

    async def list_commands(self, machine_id: str, page: Page) -> list[Command]:
        if machine_id:
            validation.name(machine_id, "machine id")
        return await self.store.list_commands(machine_id or None, page)

    async def list_exits(self, chatroom: str, role: str, page: Page) -> list[RecordedExit]:
        if chatroom:
            validation.name(chatroom, "chatroom")
        if role:
            validation.name(role, "role")
        return await self.store.list_exits(chatroom or None, role or None, page)


def _restarting(agent: Agent) -> AgentStatus:
    """The status of an agent a start was just issued for: `starting`, unless its
    process is still shown running (a stop before the start has not been carried out:
    no exit recorded), which it stays until its exit is recorded."""
    if agent.status == AgentStatus.RUNNING and agent.pid is not None:
        return AgentStatus.RUNNING
    return AgentStatus.STARTING
