"""An agent's side of Vigil: stay live on one session and take task after task.

    async with client.agent() as agent:       # chatroom/role/kind from the environment
        async for task in agent.tasks():        # pushed, one at a time
            await task.start()
            ...                                  # the work
            await task.complete()

The session joins when the block is entered and leaves when it is left, with the reason
that fits: `left` on a normal exit, `signal` on SIGINT/SIGTERM (handled while the block
runs: the block is cancelled, ends quietly, and `agent.signalled` names the signal),
`error` when an exception escapes. A task the agent received but never started is
handed back by the server if the session drops; once started, it is the agent's until it
completes it or releases it (or its process exits, for a remote agent).

`tasks()` takes one round trip per task where it can (`pipelined`, the default): a task
is claimed and started in one step (it arrives in progress; `start()` then has nothing
left to do), and completing a task claims and starts the role's next pending one for the
same session in the same transaction, handed out by the next turn of the loop. A task
claimed that way and not yet handed out when the session ends is handed back (released,
not recovered); if the process dies, it is recovered with the session, as any claim.
`next_task()` and `receive_one()` claim one task at a time, as `vigil wait-for-task`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from vigil.client._errors import ClientConfigError, RPCError
from vigil.client._session import ParticipantSession, SessionEnd
from vigil.core.vocab import AgentKind, OfflineReason, TaskStatus
from vigil.v1 import tasks_pb2 as tpb

if TYPE_CHECKING:
    from vigil.client._client import Client


# How long `ClaimedTask.start`/`complete` repeat a call that failed in transit
# (UNAVAILABLE and the like) before the error reaches the agent: a replica's failover
# takes keepalive time + timeout, a store outage as long as it lasts.
RETRY_FOR_S = 30.0


class Superseded(RPCError):
    """Another session took this agent's chatroom and role: this one must stop."""

    def __init__(self, chatroom: str, role: str) -> None:
        super().__init__(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"superseded: another session took {chatroom}/{role}",
        )


@dataclass
class ClaimedTask:
    """A task claimed for this agent, with the attempt that fences it: `start`,
    `complete` and `release` present that attempt, so a stale claim changes nothing.
    `session`: the pipelined agent session it came from (`AgentSession.tasks()`), whose
    next task its completion claims."""

    client: Client
    message: tpb.Task
    session: AgentSession | None = None

    @property
    def id(self) -> str:
        return self.message.id

    @property
    def attempt(self) -> int:
        return self.message.attempt

    @property
    def text(self) -> str:
        return self.message.text

    @property
    def chatroom(self) -> str:
        return self.message.chatroom

    @property
    def role(self) -> str:
        return self.message.role

    @property
    def status(self) -> TaskStatus:
        return TaskStatus.from_pb(self.message.status)

    async def start(self) -> None:
        if self.session is not None and self.status == TaskStatus.IN_PROGRESS:
            return  # claimed and started in one step: it arrived in progress
        await self._fenced(self.client.start_task, (TaskStatus.IN_PROGRESS, TaskStatus.COMPLETED))

    async def complete(self) -> None:
        call = self.client.complete_task
        if self.session is not None:
            call = self.session._complete_and_claim_next
        await self._fenced(call, (TaskStatus.COMPLETED,))

    async def _fenced(
        self,
        call: Callable[[str, int], Awaitable[tpb.Task]],
        done: tuple[TaskStatus, ...],
    ) -> None:
        """Start and complete survive a failover: the attempt fences them, so a call
        that failed in transit (its replica died or froze, perhaps after committing; the
        store was away) is repeated on another replica for up to `RETRY_FOR_S`. If the
        repeat is refused because the first call had taken effect, the task says so
        (same attempt, already `done`): that is success, not an error."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + RETRY_FOR_S
        delay, repeated = 0.05, False
        while True:
            try:
                self.message = await call(self.id, self.attempt)
                return
            except RPCError as exc:
                if repeated and exc.code == grpc.StatusCode.FAILED_PRECONDITION:
                    now = await self.client.get_task(self.id)
                    if now.attempt == self.attempt and TaskStatus.from_pb(now.status) in done:
                        self.message = now
                        return
                    raise
                if not exc.retryable or loop.time() + delay > give_up:
                    raise
            repeated = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def release(self, reason: str = "") -> None:
        """Hand the task back: pending again, for the next agent (next attempt)."""
        self.message = await self.client.release_task(self.id, reason)


def _from_env(env: Mapping[str, str], value: str | None, var: str, flag: str) -> str:
    found = value or env.get(var)
    if not found:
        raise ClientConfigError(f"no {flag}: give it, or set {var}")
    return found


class AgentSession:
    def __init__(
        self,
        client: Client,
        chatroom: str,
        role: str,
        kind: AgentKind | str = AgentKind.CUSTOM,
        *,
        handle_signals: bool = True,
        say: Callable[[str], None] | None = None,
        pipelined: bool = True,
    ) -> None:
        self.client = client
        self.session = ParticipantSession(client, chatroom, role, kind, say=say)
        self.handle_signals = handle_signals
        # tasks(): claim and start in one step, and claim the next task on completing one.
        self.pipelined = pipelined
        self._ahead: tuple[int, ClaimedTask] | None = None  # (generation, claimed task)
        self._runner: asyncio.Task[SessionEnd] | None = None
        self._owner: asyncio.Task[Any] | None = None
        self._signalled: int | None = None

    @classmethod
    def from_env(
        cls,
        client: Client,
        chatroom: str | None,
        role: str | None,
        kind: AgentKind | str | None,
        env: Mapping[str, str] | None = None,
        **kw: Any,
    ) -> AgentSession:
        env = os.environ if env is None else env
        room = _from_env(env, chatroom, "VIGIL_CHATROOM", "chatroom")
        name = _from_env(env, role, "VIGIL_ROLE", "role")
        try:
            what = AgentKind(kind or env.get("VIGIL_KIND") or AgentKind.CUSTOM)
        except ValueError:
            raise ClientConfigError(
                f"VIGIL_KIND must be remote or custom, got {env.get('VIGIL_KIND')!r}"
            ) from None
        return cls(client, room, name, what, **kw)

    @property
    def chatroom(self) -> str:
        return self.session.chatroom

    @property
    def role(self) -> str:
        return self.session.role

    @property
    def signalled(self) -> int | None:
        """The signal (SIGINT/SIGTERM) that ended the session, if one did."""
        return self._signalled

    # -- life cycle -------------------------------------------------------------

    async def __aenter__(self) -> AgentSession:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._signalled is not None:
            reason = OfflineReason.SIGNAL
        elif exc is None or isinstance(exc, Superseded):
            reason = OfflineReason.LEFT
        elif isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
            reason = OfflineReason.SIGNAL
        else:
            reason = OfflineReason.ERROR
        await self.close(reason)
        if self._signalled is not None and isinstance(exc, asyncio.CancelledError):
            # Our own signal handler cancelled the block: it ends here, cleanly, and
            # the program goes on after it (`signalled` says which signal it was).
            me = asyncio.current_task()
            if me is not None:
                me.uncancel()
            return True
        return False

    async def start(self) -> None:
        """Join; returns once the participant is live (or raises why it cannot be)."""
        self._owner = asyncio.current_task()
        self._runner = asyncio.create_task(self.session.run(), name="vigil-session")
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal, sig)
        await self._joined_or_ended()

    def _on_signal(self, sig: int) -> None:
        self._signalled = sig
        self.session.stop(OfflineReason.SIGNAL)
        if self._owner is not None:
            self._owner.cancel()

    async def close(self, reason: OfflineReason | str = OfflineReason.LEFT) -> SessionEnd | None:
        """Leave with `reason` (once) and wait for the session to end."""
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        if self._runner is None:
            return None
        await self._hand_back()
        self.session.stop(reason)
        try:
            return await asyncio.shield(self._runner)
        except RPCError:
            return None

    async def _joined_or_ended(self) -> int:
        """The current epoch once joined; raises if the session ended instead."""
        assert self._runner is not None
        joined = asyncio.ensure_future(self.session.joined.wait())
        try:
            await asyncio.wait({joined, self._runner}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            joined.cancel()
        if self._runner.done():
            end = self._runner.result()  # raises the session's RPCError
            if end == SessionEnd.SUPERSEDED:
                raise Superseded(self.chatroom, self.role)
            raise RPCError(grpc.StatusCode.CANCELLED, "the session was stopped")
        assert self.session.epoch is not None
        return self.session.epoch

    # -- tasks -------------------------------------------------------------------

    async def next_task(self) -> ClaimedTask:
        """Wait for the next task of this role and claim it for this session. If the
        session rejoins meanwhile (it was expired while paused) the wait is renewed
        under the new epoch; a lost connection is retried."""
        return await self._next(pipelined=False)

    def _take_ahead(self) -> ClaimedTask | None:
        """The task claimed for this session with the last completion, if its claim
        still holds (the session has not rejoined since: a rejoin recovers claims)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead[0] != self.session.generation:
            return None
        return ahead[1]

    async def _hand_back(self) -> None:
        """Release a task claimed ahead that the agent never took (the session ends)."""
        ahead = self._take_ahead()
        if ahead is None:
            return
        with contextlib.suppress(RPCError, TimeoutError):
            # If this fails the server recovers the claim with the session.
            await asyncio.wait_for(ahead.release("the session ended before taking it"), 5)

    async def _complete_and_claim_next(self, task_id: str, attempt: int) -> tpb.Task:
        """Complete a task of this session and claim (and start) the next one with it."""
        epoch, generation = self.session.epoch, self.session.generation
        if epoch is None or not self.session.joined.is_set():
            return await self.client.complete_task(task_id, attempt)
        reply = await self.client.complete_and_claim_next(
            self.chatroom,
            self.role,
            self.session.connection_id,
            epoch,
            task_id,
            attempt,
            start=True,
        )
        if reply.HasField("next"):
            self._ahead = (generation, ClaimedTask(self.client, reply.next, self))
        return reply.completed

    async def _next(self, pipelined: bool) -> ClaimedTask:
        ahead = self._take_ahead()
        if ahead is not None:
            return ahead
        delay = 0.05
        while True:
            epoch = await self._joined_or_ended()
            generation = self.session.generation
            wait = asyncio.ensure_future(
                self.client.await_task(
                    self.chatroom, self.role, self.session.connection_id, epoch, start=pipelined
                )
            )
            assert self._runner is not None
            renewed = asyncio.ensure_future(self.session.wait_rejoin(generation))
            try:
                await asyncio.wait(
                    {wait, renewed, self._runner}, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                renewed.cancel()
            if not wait.done():
                wait.cancel()
                with contextlib.suppress(asyncio.CancelledError, RPCError):
                    await wait
                continue  # a new epoch (or the session ended: the top of the loop says)
            try:
                return ClaimedTask(self.client, wait.result(), self if pipelined else None)
            except RPCError as exc:
                if not exc.retryable:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def tasks(self) -> AsyncIterator[ClaimedTask]:
        """Task after task, for as long as the session lasts (pipelined, unless the
        session was made with `pipelined=False`: see the module's docstring)."""
        while True:
            yield await self._next(pipelined=self.pipelined)

    async def receive_one(self) -> ClaimedTask:
        """The one-shot form (`vigil wait-for-task`): wait for one task, then leave with
        reason `task_received`, which confirms its delivery."""
        task = await self.next_task()
        await self.close(OfflineReason.TASK_RECEIVED)
        return task
