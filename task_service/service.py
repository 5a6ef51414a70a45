"""The task service's logic, free of gRPC: chatrooms, sending, pushed delivery, the
one `transition` function, deadline handling, and recovery on liveness events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any

from vigil.client import ClientConfig
from vigil.core import logs, validation
from vigil.core.aio import cancel_and_wait
from vigil.core.auth.principal import Principal
from vigil.core.auth.rules import chatroom_scope
from vigil.core.auth.store import AuthStore
from vigil.core.clock import Clock
from vigil.core.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    StorageError,
)
from vigil.core.paging import Page
from vigil.core.pg_listen import Listener
from vigil.core.timings import Timings
from vigil.core.vocab import (
    MACHINES_CHATROOM,
    RESERVED_CHATROOM_PREFIX,
    AgentKind,
    DesiredState,
    NotificationKind,
    OfflineReason,
    TaskStatus,
    TokenKind,
)
from vigil.task_service import audit, fsm, policy
from vigil.task_service.agents import Agents
from vigil.task_service.agents_store import AgentStore, AgentTx
from vigil.task_service.audit import Broken
from vigil.task_service.metrics import TaskMetrics
from vigil.task_service.model import Chatroom, Notification, Role, Task, Transition
from vigil.task_service.presence import Presence, PresenceFollower
from vigil.task_service.store import (
    COMMAND_CHANNEL,
    NOTIFICATION_CHANNEL,
    ROLE_CHANNEL,
    Effects,
    TaskStore,
    TaskTx,
)

log = logging.getLogger(__name__)

DUE_BATCH = 500
SAFETY_WAKE_S = 5.0  # waiters and the scheduler re-check now and then even if not woken
SYSTEM = "vigil"
# A person's release: the recovery trigger for the status the task is in.


MAX_ROLES = 256
AUDIT_PAGE = 500  # tasks per snapshot when verifying the audit log
MAX_ATTEMPT = 2**31 - 1  # tasks.attempt is an integer
PRESENCE_WAIT_S = 2.0  # how long a claim waits for its join to reach this replica's view


def check_task_id(task_id: str) -> str:
    return validation.uuid_str(task_id, "task id")


def check_role(r: Role) -> None:
    """A role as a chatroom may hold it: a custom role is only a name; a remote role
    names its machine and runs a harness or (where allowed) one command line."""
    validation.name(r.role, "role")
    if r.kind == AgentKind.CUSTOM:
        if r.machine or r.harness or r.command:
            raise InvalidArgument(f"custom role {r.role!r} takes no machine, harness or command")
        return
    if not r.machine:
        raise InvalidArgument(
            f"remote role {r.role!r} needs the machine whose daemon runs it "
            f"(e.g. --role {r.role}=remote:MACHINE:HARNESS)"
        )
    validation.name(r.machine, f"role {r.role!r} machine")
    if bool(r.harness) == bool(r.command):
        raise InvalidArgument(
            f"remote role {r.role!r} runs either a harness (a name its machine defines, "
            f"e.g. --role {r.role}=remote:{r.machine}:claude) or a command line, not "
            f"{'both' if r.harness else 'neither'}"
        )
    if r.harness:
        validation.name(r.harness, f"role {r.role!r} harness")
    if r.command:
        validation.text(
            r.command, f"role {r.role!r} command", validation.MAX_COMMAND, one_line=True
        )


class TaskService:
    def __init__(
        self,
        store: TaskStore,
        agent_store: AgentStore,
        auth: AuthStore,
        url: str,
        liveness: ClientConfig,
        timings: Timings,
        clock: Clock,
        metrics: TaskMetrics,
        on_revoked: Callable[[list[str]], None] = lambda ids: None,
    ) -> None:
        self.store = store
        self.timings = timings
        self.clock = clock
        self.metrics = metrics
        self.presence = PresenceFollower(
            liveness, self._participant_offline, self._participant_joined
        )
        self.agents = Agents(
            store,
            agent_store,
            clock,
            timings,
            metrics,
            self.presence,
            auth,
            on_agent_gone=self.claimer_gone,
            on_revoked=on_revoked,
            after_commit=self.after_commit,
            poke=self.poke,
        )
        self.listener = Listener(
            url,
            {
                ROLE_CHANNEL: self._role_woken,
                NOTIFICATION_CHANNEL: self._notified,
                COMMAND_CHANNEL: self.agents.woken,
            },
        )
        self._waiters: dict[tuple[str, str], set[asyncio.Event]] = {}
        self._notification_watchers: set[asyncio.Event] = set()
        self._poke = asyncio.Event()
        self._wake_at: datetime | None = None  # when the scheduler wakes next by itself
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()

    # -- life cycle -------------------------------------------------------

    async def start(self) -> None:
        self.listener.start()
        self.presence.start()
        self._tasks = [
            asyncio.create_task(self._scheduler(), name="task-deadlines"),
            asyncio.create_task(self._refresh_counts(), name="task-counts"),
        ]

    async def close(self) -> None:
        for t in self._tasks:
            await cancel_and_wait(t)
        if self._background:
            await asyncio.wait(self._background, timeout=2)
        await self.presence.stop()
        await self.listener.stop()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- wake-ups -------------------------------------------------------------

    def _role_woken(self, payload: str) -> None:
        # A task became pending (here or on another replica): its deadline is a pending
        # timeout from now, which only matters if it is earlier than the next wake-up.
        self.poke(self.clock.now() + timedelta(milliseconds=self.timings.task_pending_timeout_ms))
        if not payload:
            for events in self._waiters.values():
                for ev in events:
                    ev.set()
            return
        chatroom, _, role = payload.partition("/")
        for ev in self._waiters.get((chatroom, role), ()):
            ev.set()

    def _notified(self, _payload: str) -> None:
        for ev in self._notification_watchers:
            ev.set()

    def poke(self, at: datetime | None = None) -> None:
        """Wake the scheduler if `at` (a new deadline or restart time; None: unknown)
        is earlier than the time it sleeps towards; most new deadlines are not."""
        if at is None or self._wake_at is None or at < self._wake_at:
            self._poke.set()

    def after_commit(self, effects: Effects) -> None:
        """Announce what a committed transaction produced, to this replica's waiters
        (other replicas hear the NOTIFYs the transaction sent)."""
        for machine in effects.woken_machines:
            self.agents.woken(machine)
        for key in effects.woken_roles:
            self._role_woken(f"{key[0]}/{key[1]}")
        for task, trigger, actor, reason in effects.transitions:
            logs.event(
                log,
                "task_transition",
                f"task {task.id} {trigger} -> {task.status}",
                task_id=task.id,
                chatroom=task.chatroom,
                role=task.role,
                trigger=trigger,
                status=str(task.status),
                attempt=task.attempt,
                actor=actor,
                reason=reason or None,
            )
        for machine, chatroom, role, type_, reason, requested_by in effects.commands:
            logs.event(
                log,
                "command_issued",
                f"{type_} of {chatroom}/{role} sent to machine {machine}",
                machine=machine,
                chatroom=chatroom,
                role=role,
                type=type_,
                reason=reason,
                requested_by=requested_by,
            )
        for n in effects.notifications:
            self.metrics.notifications.labels(n.kind).inc()
            logs.event(
                log,
                "notification",
                n.message,
                kind=str(n.kind),
                chatroom=n.chatroom,
                role=n.role,
                task_id=n.task_id,
                notification_id=n.id,
            )
        if effects.notifications:
            self._notified("")

    # -- chatrooms ----------------------------------------------------------

    async def create_chatroom(self, name: str, roles: list[Role]) -> Chatroom:
        validation.name(name, "chatroom name")
        if name.startswith(RESERVED_CHATROOM_PREFIX):
            raise InvalidArgument(
                f"chatroom names starting with {RESERVED_CHATROOM_PREFIX!r} are reserved"
            )
        if not roles:
            raise InvalidArgument("a chatroom needs at least one role (e.g. --role builder=custom)")
        if len(roles) > MAX_ROLES:
            raise InvalidArgument(f"a chatroom has at most {MAX_ROLES} roles, got {len(roles)}")
        seen: set[str] = set()
        for r in roles:
            check_role(r)
            if r.role in seen:
                raise InvalidArgument(f"role {r.role!r} is listed twice")
            seen.add(r.role)
        machines = {r.machine for r in roles if r.machine}
        for machine in sorted(machines):
            if await self.agents.store.get_machine(machine) is not None:
                continue
            raise NotFound(
                f"machine {machine!r} is not registered; register it first "
                f"(vigil machine register --machine-id {machine})"
            )
        async with self.store.tx() as tx:
            created = await tx.insert_chatroom(name)
            if created is None:
                if await tx.chatroom_deleted(name):
                    raise AlreadyExists(
                        f"chatroom {name!r} was deleted; its history keeps the name: pick another"
                    )
                raise AlreadyExists(f"chatroom {name!r} already exists")
            for r in roles:
                await tx.insert_role(name, r)
                if r.kind == AgentKind.REMOTE:
                    assert r.machine is not None
                    await AgentTx(tx).insert_agent(name, r.role, r.machine)
        return Chatroom(name, tuple(roles), created)

    async def _check_new_roles(self, roles: list[Role], taken: set[str]) -> None:
        for r in roles:
            check_role(r)
            if r.role in taken:
                raise InvalidArgument(f"role {r.role!r} is listed twice or exists already")
            taken.add(r.role)
        for machine in sorted({r.machine for r in roles if r.machine}):
            if await self.agents.store.get_machine(machine) is None:
                raise NotFound(
                    f"machine {machine!r} is not registered; register it first "
                    f"(vigil machine register --machine-id {machine})"
                )

    async def update_chatroom(
        self, name: str, add: list[Role], remove: list[str], by: Principal
    ) -> Chatroom:
        """Add roles, and remove roles that have no unfinished task (their remote agents
        are stopped; their history stays)."""
        room = await self.get_chatroom(name)
        if not add and not remove:
            raise InvalidArgument("nothing to change: give roles to add or to remove")
        current = {r.role: r for r in room.roles}
        for role in remove:
            validation.name(role, "role")
            if role not in current:
                raise NotFound(f"chatroom {name!r} has no role {role!r}")
        if len(current) - len(set(remove)) + len(add) > MAX_ROLES:
            raise InvalidArgument(f"a chatroom has at most {MAX_ROLES} roles")
        if len(current) - len(set(remove)) + len(add) == 0:
            raise InvalidArgument("a chatroom keeps at least one role (delete it instead)")
        await self._check_new_roles(add, set(current))
        now = self.clock.now()
        async with self.store.tx() as tx:
            for role in remove:
                await tx.lock_role(name, role)
                if await tx.open_tasks(name, role):
                    raise FailedPrecondition(
                        f"role {role!r} has unfinished tasks: complete or cancel them first"
                    )
                await tx.remove_role(name, role, now)
            for r in add:
                if await tx.role_existed(name, r.role):
                    raise AlreadyExists(
                        f"role {r.role!r} was removed from {name!r}; its history keeps the "
                        "name: pick another"
                    )
                await tx.insert_role(name, r)
                if r.kind == AgentKind.REMOTE:
                    assert r.machine is not None
                    await AgentTx(tx).insert_agent(name, r.role, r.machine)
        for role in remove:
            if current[role].kind == AgentKind.REMOTE:
                await self.agents.set_desired(name, role, DesiredState.STOPPED, by)
        return await self.get_chatroom(name)

    async def delete_chatroom(
        self, name: str, cancel_open: bool, reason: str, by: Principal
    ) -> tuple[int, int]:
        """Delete a chatroom: its unfinished tasks are closed (with `cancel_open`; else
        it is refused while it has any), its remote agents stopped, and it is gone from
        listings and sends. Its tasks and their history are kept. Returns (tasks
        cancelled, agents stopped)."""
        room = await self.get_chatroom(name)
        validation.text(reason, "reason", validation.MAX_REASON, required=False)
        why = reason or f"chatroom {name} deleted"
        async with self.store.tx() as tx:
            open_ids = await tx.open_tasks(name)
            if open_ids and not cancel_open:
                raise FailedPrecondition(
                    f"chatroom {name!r} has {len(open_ids)} unfinished task(s): cancel them "
                    "or delete with --cancel-open"
                )
        cancelled = 0
        for task_id in open_ids:
            try:
                await self.cancel_task(task_id, by, why)
                cancelled += 1
            except FailedPrecondition:
                pass  # finished meanwhile
        remote = [r for r in room.roles if r.kind == AgentKind.REMOTE]
        for r in remote:
            await self.agents.set_desired(name, r.role, DesiredState.STOPPED, by)
        async with self.store.tx() as tx:
            await tx.lock_chatroom_roles(name)  # a send now waits, then finds no role
            if await tx.open_tasks(name):
                raise Aborted(f"a task was sent to {name!r} meanwhile; delete it again")
            await tx.delete_chatroom(name, self.clock.now())
        logs.event(
            log,
            "chatroom_deleted",
            f"chatroom {name} deleted",
            chatroom=name,
            actor=by.display,
            tasks_cancelled=cancelled,
            agents_stopped=len(remote),
        )
        return cancelled, len(remote)

    async def get_chatroom(self, name: str) -> Chatroom:
        validation.name(name, "chatroom name")
        found = await self.store.chatrooms([name])
        if not found:
            raise NotFound(f"no chatroom {name!r} (create it with `vigil chatroom create`)")
        return found[0]

    async def list_chatrooms(self, only: str | None, page: Page) -> list[Chatroom]:
        """A page of chatrooms (`only`: just that one, for a caller who sees no other)."""
        return await self.store.list_chatrooms(only, page)

    async def _role(self, chatroom: str, role: str) -> Role:
        room = await self.get_chatroom(chatroom)
        for r in room.roles:
            if r.role == role:
                return r
        names = ", ".join(r.role for r in room.roles)
        raise NotFound(f"chatroom {chatroom!r} has no role {role!r} (its roles: {names})")

    # -- sending and delivery -------------------------------------------------

    async def send(
        self, chatroom: str, role: str, text: str, by: Principal, request_id: str = ""
    ) -> Task:
        """A new task; with a request id, exactly once per (sender, request id): a
        repeat returns the task the first send created, whatever its status now."""
        validation.name(chatroom, "chatroom")
        validation.name(role, "role")
        validation.text(text, "the message text", validation.MAX_TASK_TEXT)
        if request_id:
            validation.request_id(request_id, "request_id")
        now = self.clock.now()
        sent = await self.store.send_fast(
            chatroom,
            role,
            text,
            now,
            policy.deadline_for(fsm.PENDING, now, self.timings),
            by.display,
            request_id or None,
        )
        if sent is None:
            await self._role(chatroom, role)  # raises the precise NOT_FOUND
            raise NotFound(f"chatroom {chatroom!r} takes no tasks for role {role!r}")
        task, created = sent
        if not created:
            if (task.chatroom, task.role, task.text) != (chatroom, role, text):
                raise FailedPrecondition(
                    f"request_id {request_id!r} was already used for a different message "
                    "(another chatroom, role or text): a request id names one message, so "
                    "a new message needs a new request id"
                )
            return task  # a repeat (its answer was lost): nothing more happens
        effects = Effects()
        if task.status == fsm.PENDING:
            effects.woken_roles.add((chatroom, role))
            self.poke(task.deadline_at)
        if self.presence.synced.is_set() and not self.presence.role_is_live(chatroom, role):
            # A remote role with nobody live: start its agent now, not in 5 minutes.
            async with self.store.tx() as tx:
                await self.agents.maybe_restart(
                    tx,
                    chatroom,
                    role,
                    f"a task arrived (sent by {by.display}) and no agent is live",
                )
            self.after_commit(tx.effects)
        self.after_commit(effects)
        return task

    async def await_task(
        self,
        chatroom: str,
        role: str,
        connection_id: str,
        epoch: int,
        by: Principal,
        start: bool = False,
    ) -> Task:
        """Wait (pushed, not polled) until a task of the role can be claimed for this
        participant; claim it atomically (with `start`, claim and start it in one
        transaction) and return it. The participant must be live with this connection
        and epoch and held by the caller: a claim is bound to liveness."""
        validation.name(chatroom, "chatroom")
        validation.name(role, "role")
        connection_id = validation.uuid_str(connection_id, "connection_id")
        validation.positive(epoch, "epoch")
        await self._held_by(chatroom, role, connection_id, epoch, by, wait=PRESENCE_WAIT_S)
        # Listen first, then claim: a task sent after the claim found none wakes us.
        key = (chatroom, role)
        woken = asyncio.Event()
        self._waiters.setdefault(key, set()).add(woken)
        self.metrics.waiting_agents.inc()
        try:
            first = True
            while True:
                if not first:
                    woken.clear()
                    await self._held_by(chatroom, role, connection_id, epoch, by)
                task = await self._claim(chatroom, role, connection_id, epoch, by, start)
                if task is not None:
                    return task
                if first:
                    if not await self.store.role_takes_tasks(chatroom, role):
                        await self._role(chatroom, role)  # NOT_FOUND, saying precisely why
                    first = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), SAFETY_WAKE_S)
        finally:
            self.metrics.waiting_agents.dec()
            self._waiters[key].discard(woken)
            if not self._waiters[key]:
                del self._waiters[key]

    async def _held_by(
        self,
        chatroom: str,
        role: str,
        connection_id: str,
        epoch: int,
        by: Principal,
        wait: float = 0.0,
    ) -> None:
        """FAILED_PRECONDITION unless (connection, epoch) is the live participant of the
        role, held by `by` (or `by` is an admin). A join may take `wait` seconds to reach
        this replica's view of presence."""
        deadline = time.monotonic() + wait
        while True:
            p = self.presence.roles.get((chatroom, role))
            if p is not None and p.live and p.epoch == epoch and p.connection_id == connection_id:
                if by.is_admin or p.token_id is None or p.token_id == by.token_id:
                    return
                raise PermissionDenied(
                    f"{chatroom}/{role} epoch {epoch} is held by {p.principal}, not {by.display}"
                )
            if time.monotonic() >= deadline:
                raise FailedPrecondition(
                    f"no live participant {chatroom}/{role} with this connection and epoch "
                    f"{epoch}: join (or rejoin) first; a claim is bound to a live participant"
                )
            await asyncio.sleep(0.02)

    async def _claim(
        self,
        chatroom: str,
        role: str,
        connection_id: str,
        epoch: int,
        by: Principal,
        start: bool = False,
    ) -> Task | None:
        now = self.clock.now()
        fsm.transition(fsm.PENDING, "claimTask")
        deadline = policy.deadline_for(fsm.ACKNOWLEDGED, now, self.timings)
        reason = f"claimed by connection {connection_id} epoch {epoch}"
        if start:
            fsm.transition(fsm.ACKNOWLEDGED, "startTask")
            rows = await self.store.take_fast(
                chatroom, role, connection_id, epoch, now, deadline, by.display, by.token_id,
                reason,
            )  # fmt: skip
            effects = Effects()
            taken = self._taken(rows, now, by, reason, effects)
            self.after_commit(effects)
            return taken
        # One call: the task this participant holds already (asked again: its first
        # answer was lost on the way, so the same claim, not a second task), else the
        # role's oldest pending one.
        task = await self.store.claim_fast(
            chatroom, role, connection_id, epoch, now, deadline, by.display, by.token_id, reason
        )
        if task is None or task.acknowledged_at != now:
            return task  # none, or the claim it held already
        effects = Effects()
        effects.transitions.append((task, "claimTask", by.display, reason))
        self.after_commit(effects)
        self.metrics.transitions.labels("claimTask").inc()
        self.poke(deadline)  # the acknowledged deadline may be the earliest now
        return task

    def _taken(
        self, rows: list[Task], now: datetime, by: Principal, reason: str, effects: Effects
    ) -> Task | None:
        """The task a claim (`take_fast`'s rows) handed the participant, None if none;
        the transitions made now are added to `effects`."""
        for row in rows:
            if row.status == fsm.ACKNOWLEDGED and row.acknowledged_at == now:
                effects.transitions.append((row, "claimTask", by.display, reason))
                self.metrics.transitions.labels("claimTask").inc()
            elif row.status == fsm.IN_PROGRESS and row.started_at == now:
                effects.transitions.append((row, "startTask", by.display, "started"))
                self.metrics.transitions.labels("startTask").inc()
        if not rows:
            return None
        taken = rows[-1]
        if taken.status == fsm.ACKNOWLEDGED and taken.acknowledged_at == now:
            self.poke(taken.deadline_at)  # the acknowledged deadline may be the earliest now
        return taken

    async def complete_and_claim_next(
        self,
        chatroom: str,
        role: str,
        connection_id: str,
        epoch: int,
        task_id: str,
        attempt: int,
        start: bool,
        by: Principal,
    ) -> tuple[Task, Task | None]:
        """A long-lived session's step, in one transaction: complete the task it holds
        (fenced as `complete_task`) and claim the role's next pending task for the same
        participant (with `start`, started too) if one is pending now. Never waits.
        Returns (the completed task, the claimed one or None)."""
        validation.name(chatroom, "chatroom")
        validation.name(role, "role")
        connection_id = validation.uuid_str(connection_id, "connection_id")
        validation.positive(epoch, "epoch")
        task_id = check_task_id(task_id)
        try:
            await self._held_by(chatroom, role, connection_id, epoch, by)
            live = True
        except FailedPrecondition:
            live = False  # complete all the same; claim nothing (a claim needs liveness)
        token = None if by.is_admin else by.token_id
        rows: list[Task] = []
        now = self.clock.now()
        reason = f"claimed by connection {connection_id} epoch {epoch}"
        if (token is not None or by.is_admin) and 0 <= attempt <= MAX_ATTEMPT:
            scope = None if by.kind in (TokenKind.ADMIN, TokenKind.READONLY) else by.chatroom
            rows = await self.store.complete_and_claim_fast(
                task_id, attempt, token, scope, by.display, now,
                policy.deadline_for(fsm.PENDING, now, self.timings), chatroom, role,
                connection_id, epoch, policy.deadline_for(fsm.ACKNOWLEDGED, now, self.timings),
                reason, by.token_id, start, live,
            )  # fmt: skip
        if not rows:
            # The general path says precisely why (or completes what the fast path does
            # not handle); the session then waits for its next task with AwaitTask.
            task = await self.get_task(task_id, by)
            if (task.chatroom, task.role) != (chatroom, role):
                raise InvalidArgument(
                    f"task {task_id} is of {task.chatroom}/{task.role}, not of the "
                    f"participant {chatroom}/{role}"
                )
            return await self.complete_task(task_id, attempt, by), None
        done = rows[0]
        effects = Effects()
        effects.transitions.append((done, "completeTask", by.display, "completed"))
        self.metrics.transitions.labels("completeTask").inc()
        promoted = [r for r in rows[1:] if r.status == fsm.PENDING]
        for p in promoted:
            effects.transitions.append(
                (p, "promoteNextTask", SYSTEM, "the role's active task ended")
            )
            self.metrics.transitions.labels("promoteNextTask").inc()
        taken = self._taken(rows[1 + len(promoted) :], now, by, reason, effects)
        for p in promoted:
            if taken is None or taken.id != p.id:  # left pending: its waiters, its deadline
                effects.woken_roles.add((p.chatroom, p.role))
                self.poke(p.deadline_at)
        self.after_commit(effects)
        if taken is not None:
            self.delivered(taken)
        return done, taken

    def delivered(self, task: Task) -> None:
        self.metrics.delivery.observe((self.clock.now() - task.created_at).total_seconds())
        # The claimer may already be known gone (its drop raced the claim).
        assert task.assigned_to is not None and task.claim_epoch is not None
        state = self.presence.claimer_state(
            task.chatroom, task.role, task.assigned_to, task.claim_epoch
        )
        if state == "gone":
            self._spawn(self.claimer_gone(task.id, "the claimer went offline during delivery"))

    def delivery_failed(self, task: Task) -> None:
        """The AwaitTask stream ended around the write. If the claimer's session is still
        live it may well have the task: its leave decides (task_received, or any other
        reason, which recovers). Otherwise the delivery failed: recover at once."""
        self._spawn(self._settle_delivery(task))

    async def _settle_delivery(self, task: Task) -> None:
        assert task.assigned_to is not None and task.claim_epoch is not None
        # The claimer's join may not have reached the presence view yet: give it a moment.
        for _ in range(25):
            state = self.presence.claimer_state(
                task.chatroom, task.role, task.assigned_to, task.claim_epoch
            )
            if state in ("live", "received"):
                return
            if state == "gone":
                break
            await asyncio.sleep(0.02)
        await self.claimer_gone(task.id, "delivery failed")

    # -- the FSM --------------------------------------------------------------

    async def transition(
        self, tx: TaskTx, task: Task, trigger: str, actor: str, reason: str, now: datetime
    ) -> Task:
        """The one way a task's status changes (the database refuses any other)."""
        to = fsm.transition(task.status, trigger)
        if trigger in ("startTask", "completeTask", "cancelTask"):
            args: tuple[object, ...] = (task.id, now)
        else:
            args = (task.id, now, policy.deadline_for(to, now, self.timings))
        changed = await tx.apply(trigger, actor, reason, *args)
        if changed is None:
            raise NotFound(f"task {task.id} disappeared")
        self.metrics.transitions.labels(trigger).inc()
        if to in fsm.TERMINAL:
            await self._promote(tx, task.chatroom, task.role, now)
        return changed

    async def _promote(self, tx: TaskTx, chatroom: str, role: str, now: datetime) -> None:
        if await tx.role_has_active(chatroom, role):
            return
        next_id = await tx.next_queued(chatroom, role)
        if next_id is None:
            return
        locked = await tx.lock_task(next_id)
        assert locked is not None
        await self.transition(
            tx, locked[0], "promoteNextTask", SYSTEM, "the role's active task ended", now
        )

    async def _locked(self, tx: TaskTx, task_id: str) -> tuple[Task, AgentKind]:
        """Lock the task's role, then the task (always in that order: no deadlocks)."""
        task = await self.store.get_task(task_id)
        if task is None:
            raise NotFound(f"no task {task_id}")
        await tx.lock_role(task.chatroom, task.role)
        locked = await tx.lock_task(task_id)
        if locked is None:
            raise NotFound(f"no task {task_id}")
        return locked

    def _check_attempt(self, task: Task, attempt: int, what: str) -> None:
        if attempt > task.attempt:
            raise FailedPrecondition(
                f"cannot {what} task {task.id} with attempt {attempt}: it is on attempt "
                f"{task.attempt}, and no later attempt was ever handed out"
            )
        if attempt != task.attempt:
            self.metrics.stale_attempts.inc()
            raise FailedPrecondition(
                f"cannot {what} task {task.id} with attempt {attempt}: it is on attempt "
                f"{task.attempt} (it was redelivered; this claim is stale)"
            )

    async def _by_person(
        self,
        task_id: str,
        trigger: str | None,
        by: Principal,
        reason: str,
        attempt: int | None = None,
    ) -> Task:
        """A person's (or agent's) request; trigger None means a release, whose trigger
        depends on the status found under the lock. Start, complete and release belong
        to whoever's participant claimed the task (and admins); cancel to admins."""
        task_id = check_task_id(task_id)
        validation.text(reason, "reason", validation.MAX_REASON, required=False)
        now = self.clock.now()
        if trigger in ("startTask", "completeTask") and attempt is not None:
            done = await self._fast_by_claimer(task_id, trigger, by, attempt, now)
            if done is not None:
                return done
        async with self.store.tx() as tx:
            task, _kind = await self._locked(tx, task_id)
            chatroom_scope(by, task.chatroom)
            if trigger != "cancelTask":
                self._check_claimer(task, by)
            if trigger is None:
                if task.status not in (fsm.ACKNOWLEDGED, fsm.IN_PROGRESS):
                    raise FailedPrecondition(
                        f"cannot release task {task.id}: it is {task.status}; only an "
                        "acknowledged or in_progress task can be handed back"
                    )
                trigger = "releaseTask"
            if attempt is not None:
                self._check_attempt(task, attempt, trigger.removesuffix("Task").lower())
            changed = await self.transition(tx, task, trigger, by.display, reason, now)
        self.after_commit(tx.effects)
        return changed

    async def _fast_by_claimer(
        self, task_id: str, trigger: str, by: Principal, attempt: int, now: datetime
    ) -> Task | None:
        """Start or complete in one call when the caller's claim, the attempt and the
        status allow it (the common case); None otherwise (the general path then says
        precisely why, or finds the task changed meanwhile)."""
        if not 0 <= attempt <= MAX_ATTEMPT:
            return None
        token = None if by.is_admin else by.token_id
        if token is None and not by.is_admin:
            return None  # a claimer without a token (a certificate) claims nothing
        scope = None if by.kind in (TokenKind.ADMIN, TokenKind.READONLY) else by.chatroom
        effects = Effects()
        if trigger == "startTask":
            started = await self.store.start_fast(task_id, attempt, token, scope, by.display, now)
            if started is None:
                return None
            effects.transitions.append((started, trigger, by.display, "started"))
            changed = [started]
        else:
            changed = await self.store.complete_fast(
                task_id, attempt, token, scope, by.display, now,
                policy.deadline_for(fsm.PENDING, now, self.timings),
            )  # fmt: skip
            if not changed:
                return None
            effects.transitions.append((changed[0], trigger, by.display, "completed"))
            for promoted in changed[1:]:
                effects.transitions.append(
                    (promoted, "promoteNextTask", SYSTEM, "the role's active task ended")
                )
                effects.woken_roles.add((promoted.chatroom, promoted.role))
                self.metrics.transitions.labels("promoteNextTask").inc()
                self.poke(promoted.deadline_at)
        self.metrics.transitions.labels(trigger).inc()
        self.after_commit(effects)
        return changed[0]

    @staticmethod
    def _check_claimer(task: Task, by: Principal) -> None:
        if by.is_admin:
            return
        if task.claimed_by_token is None or task.claimed_by_token != by.token_id:
            who = task.claimed_by or "nobody"
            raise PermissionDenied(
                f"task {task.id} was claimed by {who}, not {by.display}: only its claimer "
                "(or an admin) may start, complete or release it"
            )

    async def start_task(self, task_id: str, attempt: int, by: Principal) -> Task:
        return await self._by_person(task_id, "startTask", by, "started", attempt)

    async def complete_task(self, task_id: str, attempt: int, by: Principal) -> Task:
        return await self._by_person(task_id, "completeTask", by, "completed", attempt)

    async def cancel_task(self, task_id: str, by: Principal, reason: str) -> Task:
        return await self._by_person(task_id, "cancelTask", by, reason or "cancelled")

    async def release_task(self, task_id: str, by: Principal, reason: str) -> Task:
        """A claimer (or a person) hands a claimed task back: pending again, next attempt."""
        return await self._by_person(task_id, None, by, reason or "released")

    # -- recovery ---------------------------------------------------------------

    async def _participant_joined(self, p: Presence) -> None:
        if p.chatroom == MACHINES_CHATROOM:
            return
        await self.agents.clean_join(p.chatroom, p.role)  # a clean join closes a circuit

    async def _participant_offline(self, p: Presence) -> None:
        if p.chatroom == MACHINES_CHATROOM:
            await self.agents.machine_went_offline(p.role)
            return
        now = self.clock.now()
        if p.offline_reason == OfflineReason.TASK_RECEIVED:
            await self.store.mark_delivered(p.connection_id, p.epoch, now)
            return
        # Its claims go with it: one it never received, or one it was working on (a
        # session's liveness and its claims are one).
        for task_id in await self.store.claims_of(p.connection_id, p.epoch):
            await self.claimer_gone(
                task_id,
                f"its claimer {p.chatroom}/{p.role} (epoch {p.epoch}) went offline "
                f"({p.offline_reason})",
            )

    async def claimer_gone(self, task_id: str, why: str) -> None:
        """The fast path: the claimer is known gone; recover now (or give up at the cap)."""
        now = self.clock.now()
        try:
            async with self.store.tx() as tx:
                task, _kind = await self._locked(tx, task_id)
                if task.status not in (fsm.ACKNOWLEDGED, fsm.IN_PROGRESS):
                    return
                await tx.mark_claimer_dead(task.id, now)
                snap = self._snapshot(task, _kind, claimer_dead=True)
                decision = policy.decide_on_claimer_gone(snap, now, self.timings, why)
                await self._apply_decision(tx, task, decision, now, "claimer_gone")
            self.after_commit(tx.effects)
        except (StorageError, NotFound) as exc:
            log.warning("recovering task %s (%s) failed: %s", task_id, why, exc)

    def _claimer_known_dead(self, task: Task) -> bool:
        if task.claimer_dead_at is not None:
            return True
        if task.status != fsm.ACKNOWLEDGED or task.delivered_at is not None:
            return False
        if task.assigned_to is None or task.claim_epoch is None:
            return False
        state = self.presence.claimer_state(
            task.chatroom, task.role, task.assigned_to, task.claim_epoch
        )
        return state == "gone"

    def _snapshot(self, task: Task, kind: AgentKind, *, claimer_dead: bool) -> policy.TaskSnapshot:
        # Until the presence view is synced, assume the role is live: acting on
        # "nobody is there" without knowing would restart or notify wrongly.
        live = (not self.presence.synced.is_set()) or self.presence.role_is_live(
            task.chatroom, task.role
        )
        return policy.TaskSnapshot(
            status=task.status,
            role_kind=kind,
            attempt=task.attempt,
            deadline_at=task.deadline_at,
            claimer_known_dead=claimer_dead,
            role_has_live_participant=live,
            recoveries=task.recoveries,
        )

    async def _apply_decision(
        self, tx: TaskTx, task: Task, d: policy.Decision, now: datetime, why: str
    ) -> None:
        if d.action == "recover":
            assert d.trigger is not None
            await self.transition(tx, task, d.trigger, SYSTEM, d.reason, now)
            self.metrics.recoveries.labels(d.trigger, why).inc()
            return
        if d.action == "give_up":
            await tx.set_needs_attention(task.id, now)
            await tx.notify(
                NotificationKind.REDELIVERY_CAP,
                task.chatroom,
                task.role,
                task.id,
                task.attempt,
                f"task {task.id} in {task.chatroom}/{task.role} is not redelivered again: "
                f"{d.reason}; cancel it or send it anew",
            )
            return
        if d.action == "restart":
            # Nobody took this pending task for the whole timeout: restart the role's
            # agent even if its process runs (it is stuck); at most one pair at a time.
            await self.agents.maybe_restart(tx, task.chatroom, task.role, d.reason, stuck=True)
        elif d.action == "notify":
            assert d.notification_kind is not None
            await tx.notify(
                d.notification_kind,
                task.chatroom,
                task.role,
                task.id,
                task.attempt,
                f"task {task.id} in {task.chatroom}/{task.role}: {d.reason}",
            )
        if d.next_deadline_at != task.deadline_at:
            await tx.set_deadline(task.id, d.next_deadline_at)

    # -- deadlines --------------------------------------------------------------

    async def run_due(self) -> int:
        """One scheduler pass: handle every task whose deadline has passed."""
        handled = 0
        while True:
            started = time.perf_counter()
            now = self.clock.now()
            async with self.store.tx() as tx:
                due = await tx.due(now, DUE_BATCH)
                for task, kind in due:
                    snap = self._snapshot(task, kind, claimer_dead=self._claimer_known_dead(task))
                    decision = policy.decide_at_deadline(snap, now, self.timings)
                    if task.deadline_at is not None:
                        lag = (self.clock.now() - task.deadline_at).total_seconds()
                        self.metrics.deadline_lag.observe(max(0.0, lag))
                    await self._apply_decision(tx, task, decision, now, "timeout")
            self.after_commit(tx.effects)
            self.metrics.scheduler_pass.observe(time.perf_counter() - started)
            handled += len(due)
            if len(due) < DUE_BATCH:
                return handled

    async def _scheduler(self) -> None:
        while True:
            self._poke.clear()
            sleep = SAFETY_WAKE_S
            try:
                await self.run_due()
                await self.agents.run_due_restarts(self.clock.now())
                for deadline in (
                    await self.store.next_deadline(),
                    await self.agents.next_restart(),
                ):
                    if deadline is not None:
                        sleep = min(sleep, (deadline - self.clock.now()).total_seconds())
            except StorageError as exc:
                log.warning("deadline pass failed, retrying: %s", exc)
                sleep = 1.0
            if sleep > 0:
                self._wake_at = self.clock.now() + timedelta(seconds=sleep)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poke.wait(), sleep)
                self._wake_at = None

    # -- queries ----------------------------------------------------------------

    async def get_task(self, task_id: str, by: Principal | None = None) -> Task:
        task = await self.store.get_task(check_task_id(task_id))
        if task is None:
            raise NotFound(f"no task {task_id}")
        if by is not None:
            chatroom_scope(by, task.chatroom)
        return task

    async def history(self, task_id: str, by: Principal | None = None) -> list[Transition]:
        task = await self.get_task(task_id, by)
        return await self.store.history(task.id)

    async def list_tasks(self, chatroom: str, status: TaskStatus | None, page: Page) -> list[Task]:
        """A page of tasks, newest first (read `page.fetch`: one more than the page)."""
        if chatroom:
            validation.name(chatroom, "chatroom")
        return await self.store.list_tasks(chatroom or None, status, page)

    async def list_notifications(
        self, after_id: int, page: Page, newest_first: bool = False, chatroom: str | None = None
    ) -> list[Notification]:
        """A page of notifications, oldest first after `after_id` (or newest first)."""
        if after_id < 0:
            raise InvalidArgument(f"after_id must be 0 or more, got {after_id}")
        if newest_first:
            return await self.store.newest_notifications(page.fetch, chatroom, page.arg(0))
        after = max(after_id, page.arg(0) or 0)
        return await self.store.list_notifications(after, page.fetch, chatroom)

    async def verify_audit(self, task_id: str = "") -> tuple[int, int, Broken | None]:
        """Walk the audit chains (of every task, or of one): (tasks checked, rows
        checked, the first broken link or None). A full walk sets the audit metrics."""
        only = check_task_id(task_id) if task_id else None
        tasks = rows = 0
        after: str | None = None
        while True:
            page = await self.store.audit_page(after, only, AUDIT_PAGE)
            for tid, status, attempt, chain in page:
                tasks += 1
                rows += len(chain)
                broken = audit.verify_task(tid, status, attempt, chain)
                if broken is not None:
                    self._audited(only, rows, ok=False)
                    return tasks, rows, broken
            if len(page) < AUDIT_PAGE:
                break
            after = page[-1][0]
        if only and not tasks:
            raise NotFound(f"no task {task_id}")
        self._audited(only, rows, ok=True)
        return tasks, rows, None

    def _audited(self, only: str | None, rows: int, *, ok: bool) -> None:
        if only:
            return
        self.metrics.audit_ok.set(1 if ok else 0)
        self.metrics.audit_rows.set(rows)
        self.metrics.audit_at.set(self.clock.now().timestamp())

    async def count_tasks(self, chatroom: str) -> tuple[dict[TaskStatus, int], int]:
        if chatroom:
            validation.name(chatroom, "chatroom")
        return await self.store.counts(chatroom or None)

    async def watch_notifications(
        self, after_id: int, chatroom: str | None = None
    ) -> AsyncIterator[Notification]:
        if after_id < 0:
            raise InvalidArgument("after_id must be >= 0")
        woken = asyncio.Event()
        self._notification_watchers.add(woken)
        try:
            last = after_id
            while True:
                woken.clear()
                for n in await self.store.list_notifications(last, 1000, chatroom=chatroom):
                    last = n.id
                    yield n
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), SAFETY_WAKE_S)
        finally:
            self._notification_watchers.discard(woken)

    async def _refresh_counts(self) -> None:
        while True:
            try:
                counts, attention = await self.store.counts()
                for status in fsm.STATUSES:
                    self.metrics.tasks.labels(status).set(counts.get(status, 0))
                self.metrics.needs_attention.set(attention)
                self.metrics.oldest_overdue.set(await self.store.oldest_overdue(self.clock.now()))
                await self.agents.refresh_metrics()
            except StorageError as exc:
                log.debug("task counts: %s", exc)
            await asyncio.sleep(2)
