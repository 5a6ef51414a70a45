"""`Client`: one object that talks to Vigil. It owns the channels (to the liveness
service and to the task service, the same one when they share an address), attaches
the caller's credentials to every call, and turns every failure into an `RPCError`."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from vigil.client._channel import open_channel
from vigil.client._config import ClientConfig
from vigil.client._errors import RPCError, from_grpc
from vigil.client._streamed import StreamedCalls
from vigil.core.vocab import AgentKind, TaskStatus, TokenKind
from vigil.v1 import liveness_pb2 as lpb
from vigil.v1 import liveness_pb2_grpc as lpb_grpc
from vigil.v1 import machines_pb2 as mpb
from vigil.v1 import machines_pb2_grpc as mpb_grpc
from vigil.v1 import tasks_pb2 as tpb
from vigil.v1 import tasks_pb2_grpc as tpb_grpc
from vigil.v1 import tokens_pb2 as kpb
from vigil.v1 import tokens_pb2_grpc as kpb_grpc

if TYPE_CHECKING:
    from vigil.client._agent import AgentSession
    from vigil.client._session import ParticipantSession

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 5.0
MAX_PAGE = 1000  # the largest page a server gives
AUDIT_TIMEOUT_S = 600.0  # a full audit walk reads every row
# `send` repeats a request whose answer was lost (the same request id: one task).
SEND_ATTEMPTS = 4
SEND_TIMEOUT_S = 30.0
SEND_RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
LIVENESS = lpb.DESCRIPTOR.services_by_name["Liveness"].full_name
TASKS = tpb.DESCRIPTOR.services_by_name["Tasks"].full_name


class Client:
    """Use as `async with Client(config) as client:` (or `vigil.client.connect()`)."""

    def __init__(self, config: ClientConfig) -> None:
        config.check_transport()
        self.config = config
        self._liveness_ch = open_channel(
            config.liveness_addr, config, LIVENESS, "VIGIL_LIVENESS_ADDR"
        )
        self._tasks_ch = (
            self._liveness_ch
            if config.tasks_addr == config.liveness_addr
            else open_channel(config.tasks_addr, config, TASKS, "VIGIL_TASKS_ADDR")
        )
        self.liveness = lpb_grpc.LivenessStub(self._liveness_ch)
        self.tasks = tpb_grpc.TasksStub(self._tasks_ch)
        self.machines = mpb_grpc.MachinesStub(self._tasks_ch)
        self.tokens = kpb_grpc.TokensStub(self._tasks_ch)
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {config.token}"),) if config.token else ()
        )
        self._sends = StreamedCalls(
            lambda: self.tasks.SendMessages(metadata=self.metadata),
            lambda request, timeout: self.call(self.tasks.SendMessage, request, timeout=timeout),
            lambda request: request.request_id,
            lambda answer: answer.request_id,
            "task",
            "send",
        )
        self._steps = StreamedCalls(
            lambda: self.tasks.CompleteAndClaimNextStream(metadata=self.metadata),
            lambda request, timeout: self.call(
                self.tasks.CompleteAndClaimNext, request, timeout=timeout
            ),
            lambda request: f"{request.id}/{request.attempt}",
            lambda answer: f"{answer.id}/{answer.attempt}",
            "done",
            "step",
        )

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._sends.close()
        await self._steps.close()
        await self._liveness_ch.close()
        if self._tasks_ch is not self._liveness_ch:
            await self._tasks_ch.close()

    async def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until a connection to Vigil is up; UNAVAILABLE after `timeout`."""
        for ch, addr in {
            (self._liveness_ch, self.config.liveness_addr),
            (self._tasks_ch, self.config.tasks_addr),
        }:
            try:
                await asyncio.wait_for(ch.channel_ready(), timeout)
            except TimeoutError:
                hint = (
                    "is it running, does it serve TLS, and does VIGIL_TLS_CA (with "
                    "VIGIL_TLS_CERT under mutual TLS) match its certificate?"
                    if self.config.tls.enabled
                    else "is `vigil up` running? A TLS server needs VIGIL_TLS_CA"
                )
                raise RPCError(
                    grpc.StatusCode.UNAVAILABLE, f"cannot reach Vigil at {addr} ({hint})"
                ) from None

    async def call(self, method: Callable[..., Awaitable[T]], request: Any, **kw: Any) -> T:
        """One unary call with the client's credentials; a failure is an RPCError."""
        kw.setdefault("timeout", DEFAULT_TIMEOUT_S)
        try:
            return await method(request, metadata=self.metadata, **kw)
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc) from None

    async def pages(
        self, method: Callable[..., Awaitable[Any]], request: Any, field: str, limit: int = 0
    ) -> list[Any]:
        """Every item of a paged listing (at most `limit` when it is not 0), following
        `next_page_token` from page to page."""
        items: list[Any] = []
        if limit:
            request.page_size = min(limit, MAX_PAGE)
        while True:
            reply = await self.call(method, request)
            items.extend(getattr(reply, field))
            if limit and len(items) >= limit:
                return items[:limit]
            if not reply.next_page_token:
                return items
            request.page_token = reply.next_page_token

    async def stream(
        self, method: Callable[..., Any], request: Any, **kw: Any
    ) -> AsyncIterator[Any]:
        """The replies of a server-streaming call; a failure is an RPCError."""
        call = method(request, metadata=self.metadata, **kw)
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc) from None
        finally:
            call.cancel()

    # -- participants and agents -------------------------------------------------

    def session(
        self, chatroom: str, role: str, kind: AgentKind | str = AgentKind.CUSTOM, **kw: Any
    ) -> ParticipantSession:
        """A liveness session for (chatroom, role); run it with `await session.run()`."""
        from vigil.client._session import ParticipantSession

        return ParticipantSession(self, chatroom, role, kind, **kw)

    def agent(
        self,
        chatroom: str | None = None,
        role: str | None = None,
        kind: AgentKind | str | None = None,
        **kw: Any,
    ) -> AgentSession:
        """An agent's session: `async with client.agent() as agent: async for task in
        agent.tasks(): ...`. Chatroom, role and kind default to VIGIL_CHATROOM,
        VIGIL_ROLE and VIGIL_KIND (what a machine daemon gives the agents it starts)."""
        from vigil.client._agent import AgentSession

        return AgentSession.from_env(self, chatroom, role, kind, **kw)

    async def list_participants(
        self, chatroom: str = "", *, live_only: bool = False
    ) -> lpb.ListParticipantsResponse:
        """Every participant (all pages), with the revision of the first page: watch from
        it and apply the events over this list to miss nothing."""
        request = lpb.ListParticipantsRequest(
            chatroom=chatroom, live_only=live_only, page_size=MAX_PAGE
        )
        first = await self.call(self.liveness.ListParticipants, request)
        reply = lpb.ListParticipantsResponse(revision=first.revision)
        reply.participants.extend(first.participants)
        if first.next_page_token:
            request.page_token = first.next_page_token
            rest = await self.pages(self.liveness.ListParticipants, request, "participants")
            reply.participants.extend(rest)
        return reply

    def watch_participants(
        self, from_revision: int, chatroom: str = ""
    ) -> AsyncIterator[lpb.PresenceEvent]:
        return self.stream(
            self.liveness.WatchParticipants,
            lpb.WatchParticipantsRequest(from_revision=from_revision, chatroom=chatroom),
        )

    # -- chatrooms and tasks ---------------------------------------------------

    async def create_chatroom(self, name: str, roles: list[tpb.Role]) -> tpb.Chatroom:
        return await self.call(
            self.tasks.CreateChatroom, tpb.CreateChatroomRequest(name=name, roles=roles)
        )

    async def update_chatroom(
        self, name: str, add: list[tpb.Role] | None = None, remove: list[str] | None = None
    ) -> tpb.Chatroom:
        request = tpb.UpdateChatroomRequest(
            name=name, add_roles=add or [], remove_roles=remove or []
        )
        return await self.call(self.tasks.UpdateChatroom, request)

    async def delete_chatroom(
        self, name: str, *, cancel_open: bool = False, reason: str = ""
    ) -> tpb.DeleteChatroomResponse:
        request = tpb.DeleteChatroomRequest(name=name, cancel_open=cancel_open, reason=reason)
        return await self.call(self.tasks.DeleteChatroom, request, timeout=60)

    async def get_chatroom(self, name: str) -> tpb.Chatroom:
        return await self.call(self.tasks.GetChatroom, tpb.GetChatroomRequest(name=name))

    async def list_chatrooms(self) -> list[tpb.Chatroom]:
        request = tpb.ListChatroomsRequest(page_size=MAX_PAGE)
        return await self.pages(self.tasks.ListChatrooms, request, "chatrooms")

    async def send(
        self, chatroom: str, role: str, text: str, *, request_id: str | None = None
    ) -> tpb.Task:
        """Send a message to a role: it becomes a task (returned, pending or queued),
        exactly once. The request carries an idempotency key, `request_id` (a new UUID
        unless given), and is sent again, the same, while the answer is lost
        (UNAVAILABLE, DEADLINE_EXCEEDED, or CANCELLED by a stopping replica): at most
        SEND_ATTEMPTS times within SEND_TIMEOUT_S. A repeat returns the task the first
        one created. Give your own `request_id` (unique per sender) to retry across
        processes or after an RPCError. Sends go over the client's one SendMessages
        stream (unary SendMessage calls to a server without it)."""
        request = tpb.SendMessageRequest(
            chatroom=chatroom, role=role, text=text, request_id=request_id or str(uuid.uuid4())
        )
        loop = asyncio.get_running_loop()
        give_up = loop.time() + SEND_TIMEOUT_S
        delay = 0.1
        for attempt in range(1, SEND_ATTEMPTS + 1):
            left = min(DEFAULT_TIMEOUT_S, max(0.1, give_up - loop.time()))
            try:
                task: tpb.Task = await self._sends.call(request, left)
                return task
            except RPCError as exc:
                if (
                    not (exc.code in SEND_RETRIED or exc.cancelled_remotely)
                    or attempt == SEND_ATTEMPTS
                    or loop.time() + delay >= give_up
                ):
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")  # the last attempt returns or raises

    async def await_task(
        self, chatroom: str, role: str, connection_id: str, epoch: int, start: bool = False
    ) -> tpb.Task:
        """Wait until the server claims a task of the role for this participant (with
        `start`, claims and starts it in one step: it arrives in progress)."""
        request = tpb.AwaitTaskRequest(
            chatroom=chatroom, role=role, connection_id=connection_id, epoch=epoch, start=start
        )
        task: tpb.Task | None = None
        # Read to the end of the stream: the server ends it right after the one task,
        # and a clean end is its confirmation that the task was written.
        async for reply in self.stream(self.tasks.AwaitTask, request):
            task = reply.task
        if task is None:
            raise RPCError(grpc.StatusCode.UNAVAILABLE, "the server ended AwaitTask without a task")
        return task

    async def start_task(self, task_id: str, attempt: int) -> tpb.Task:
        return await self.call(self.tasks.StartTask, tpb.TaskRef(id=task_id, attempt=attempt))

    async def complete_task(self, task_id: str, attempt: int) -> tpb.Task:
        return await self.call(self.tasks.CompleteTask, tpb.TaskRef(id=task_id, attempt=attempt))

    async def complete_and_claim_next(
        self,
        chatroom: str,
        role: str,
        connection_id: str,
        epoch: int,
        task_id: str,
        attempt: int,
        start: bool = False,
    ) -> tpb.CompleteAndClaimNextResponse:
        """Complete a task this participant holds and, in the same transaction, claim
        (with `start`, and start) its role's next pending task for it, if there is one
        (`next` unset: none). Over the client's CompleteAndClaimNextStream (unary to a
        server without it)."""
        request = tpb.CompleteAndClaimNextRequest(
            chatroom=chatroom,
            role=role,
            connection_id=connection_id,
            epoch=epoch,
            id=task_id,
            attempt=attempt,
            start=start,
        )
        reply: tpb.CompleteAndClaimNextResponse = await self._steps.call(request, DEFAULT_TIMEOUT_S)
        return reply

    async def cancel_task(self, task_id: str, reason: str = "") -> tpb.Task:
        return await self.call(self.tasks.CancelTask, tpb.TaskRef(id=task_id, reason=reason))

    async def release_task(self, task_id: str, reason: str = "") -> tpb.Task:
        return await self.call(self.tasks.ReleaseTask, tpb.TaskRef(id=task_id, reason=reason))

    async def get_task(self, task_id: str) -> tpb.Task:
        return await self.call(self.tasks.GetTask, tpb.GetTaskRequest(id=task_id))

    async def task_history(self, task_id: str) -> list[tpb.Transition]:
        reply = await self.call(self.tasks.TaskHistory, tpb.TaskHistoryRequest(id=task_id))
        return list(reply.transitions)

    async def list_tasks(
        self, chatroom: str = "", status: TaskStatus | None = None, limit: int = 0
    ) -> list[tpb.Task]:
        """Tasks, newest first: every one, or the newest `limit`."""
        request = tpb.ListTasksRequest(
            chatroom=chatroom,
            status=status.to_pb() if status else tpb.TASK_STATUS_UNSPECIFIED,
            page_size=MAX_PAGE,
        )
        return await self.pages(self.tasks.ListTasks, request, "tasks", limit)

    async def list_notifications(
        self, after_id: int = 0, limit: int = 0, *, newest_first: bool = False
    ) -> list[tpb.Notification]:
        """Notifications after `after_id`, oldest first (or the newest, newest first):
        every one, or at most `limit`."""
        request = tpb.ListNotificationsRequest(
            after_id=after_id, newest_first=newest_first, page_size=MAX_PAGE
        )
        return await self.pages(self.tasks.ListNotifications, request, "notifications", limit)

    async def count_tasks(self, chatroom: str = "") -> dict[TaskStatus, int]:
        """Tasks by status (every status, zero included)."""
        reply = await self.call(self.tasks.CountTasks, tpb.CountTasksRequest(chatroom=chatroom))
        return {TaskStatus.from_pb(c.status): c.count for c in reply.counts}

    def watch_notifications(self, after_id: int = 0, **kw: Any) -> AsyncIterator[tpb.Notification]:
        return self.stream(
            self.tasks.WatchNotifications, tpb.WatchNotificationsRequest(after_id=after_id), **kw
        )

    async def verify_audit(self, task_id: str = "") -> tpb.VerifyAuditResponse:
        """Walk the audit log's hash chains (every task's, or one task's)."""
        request = tpb.VerifyAuditRequest(task_id=task_id)
        return await self.call(self.tasks.VerifyAudit, request, timeout=AUDIT_TIMEOUT_S)

    # -- machines and their agents ---------------------------------------------------

    async def register_machine(
        self, machine_id: str, hostname: str = "", harnesses: list[str] | None = None
    ) -> mpb.RegisterMachineResponse:
        request = mpb.RegisterMachineRequest(
            machine_id=machine_id, hostname=hostname, harnesses=harnesses or []
        )
        return await self.call(self.machines.RegisterMachine, request)

    async def list_machines(self) -> list[mpb.Machine]:
        request = mpb.ListMachinesRequest(page_size=MAX_PAGE)
        return await self.pages(self.machines.ListMachines, request, "machines")

    async def list_agents(self, chatroom: str = "") -> list[mpb.Agent]:
        request = mpb.ListAgentsRequest(chatroom=chatroom, page_size=MAX_PAGE)
        return await self.pages(self.machines.ListAgents, request, "agents")

    async def list_commands(self, machine_id: str = "", limit: int = 0) -> list[mpb.Command]:
        """Commands, newest first: every one, or the newest `limit`."""
        request = mpb.ListCommandsRequest(machine_id=machine_id, page_size=MAX_PAGE)
        return await self.pages(self.machines.ListCommands, request, "commands", limit)

    async def list_exits(
        self, chatroom: str = "", role: str = "", limit: int = 0
    ) -> list[mpb.AgentExit]:
        """Recorded exits of agent processes, newest first: every one, or the newest
        `limit`."""
        request = mpb.ListExitsRequest(chatroom=chatroom, role=role, page_size=MAX_PAGE)
        return await self.pages(self.machines.ListExits, request, "exits", limit)

    async def start_agent(self, chatroom: str, role: str) -> mpb.Agent:
        return await self.call(self.machines.StartAgent, mpb.AgentRef(chatroom=chatroom, role=role))

    async def stop_agent(self, chatroom: str, role: str) -> mpb.Agent:
        return await self.call(self.machines.StopAgent, mpb.AgentRef(chatroom=chatroom, role=role))

    async def report_exit(
        self, report: mpb.ExitReport, timeout: float = DEFAULT_TIMEOUT_S
    ) -> mpb.ExitAck:
        return await self.call(self.machines.ReportExit, report, timeout=timeout)

    def daemon_session(self) -> grpc.aio.StreamStreamCall:
        """The raw DaemonSession stream (the machine daemon drives it)."""
        return self.machines.DaemonSession(metadata=self.metadata)

    async def unregister_machine(
        self, machine_id: str, reason: str = ""
    ) -> mpb.UnregisterMachineResponse:
        """Forget a machine: its credential and its agents' credentials stop working."""
        request = mpb.UnregisterMachineRequest(machine_id=machine_id, reason=reason)
        return await self.call(self.machines.UnregisterMachine, request)

    # -- tokens ----------------------------------------------------------------------

    async def create_token(
        self,
        kind: TokenKind,
        name: str,
        *,
        chatroom: str = "",
        role: str = "",
        ttl_s: int = 0,
    ) -> kpb.CreateTokenResponse:
        """A new admin, read-only or chatroom token; its secret is in this answer only."""
        request = kpb.CreateTokenRequest(
            kind=kind.to_pb(), name=name, chatroom=chatroom, role=role, ttl_seconds=ttl_s
        )
        return await self.call(self.tokens.CreateToken, request)

    async def list_tokens(self, *, include_inactive: bool = False) -> list[kpb.Token]:
        request = kpb.ListTokensRequest(include_inactive=include_inactive, page_size=MAX_PAGE)
        return await self.pages(self.tokens.ListTokens, request, "tokens")

    async def revoke_token(self, token_id: str, reason: str = "") -> kpb.Token:
        request = kpb.RevokeTokenRequest(id=token_id, reason=reason)
        return await self.call(self.tokens.RevokeToken, request)


@contextlib.asynccontextmanager
async def connect(
    addr: str | None = None,
    *,
    token: str | None = None,
    token_file: str | None = None,
    config: ClientConfig | None = None,
    wait_ready: bool = True,
) -> AsyncIterator[Client]:
    """A connected `Client`: settings from `config`, else from the environment
    (`ClientConfig.from_env`), with `addr`, `token` and `token_file` overriding."""
    if config is None:
        config = ClientConfig.from_env(addr=addr, token_file=token_file)
    if token is not None:
        config = config.with_token(token)
    async with Client(config) as client:
        if wait_ready:
            await client.wait_ready()
        yield client
