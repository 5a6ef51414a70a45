"""gRPC adapter of the task service: decode, call `TaskService` as the authenticated
caller, encode. Listings are narrowed to what the caller may see."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc

from vigil.core import paging
from vigil.core.auth import Authenticator
from vigil.core.auth.principal import Principal
from vigil.core.auth.rules import permit, visible_chatroom
from vigil.core.errors import InvalidArgument
from vigil.core.rpc import answer_each, caller, rpc
from vigil.core.vocab import TaskStatus
from vigil.task_service import codec
from vigil.task_service.service import TaskService
from vigil.v1 import tasks_pb2 as pb
from vigil.v1 import tasks_pb2_grpc as pb_grpc
from vigil.v1.common_pb2 import CallError

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Tasks"].full_name

Ctx: TypeAlias = grpc.aio.ServicerContext

# The rules the messages of SendMessages and CompleteAndClaimNextStream meet, each.
SEND = f"{SERVICE_NAME}/SendMessage"
STEP = f"{SERVICE_NAME}/CompleteAndClaimNext"


class TasksServicer(pb_grpc.TasksServicer):
    service_name = SERVICE_NAME

    def __init__(self, svc: TaskService, auth: Authenticator) -> None:
        self.svc = svc
        self.auth = auth

    @rpc
    async def CreateChatroom(self, request: pb.CreateChatroomRequest, context: Ctx) -> pb.Chatroom:
        room = await self.svc.create_chatroom(
            request.name, [codec.role_from_pb(r) for r in request.roles]
        )
        return codec.chatroom(room)

    @rpc
    async def UpdateChatroom(self, request: pb.UpdateChatroomRequest, context: Ctx) -> pb.Chatroom:
        room = await self.svc.update_chatroom(
            request.name,
            [codec.role_from_pb(r) for r in request.add_roles],
            list(request.remove_roles),
            caller(),
        )
        return codec.chatroom(room)

    @rpc
    async def DeleteChatroom(
        self, request: pb.DeleteChatroomRequest, context: Ctx
    ) -> pb.DeleteChatroomResponse:
        cancelled, stopped = await self.svc.delete_chatroom(
            request.name, request.cancel_open, request.reason, caller()
        )
        return pb.DeleteChatroomResponse(
            name=request.name, tasks_cancelled=cancelled, agents_stopped=stopped
        )

    @rpc
    async def GetChatroom(self, request: pb.GetChatroomRequest, context: Ctx) -> pb.Chatroom:
        return codec.chatroom(await self.svc.get_chatroom(request.name))

    @rpc
    async def ListChatrooms(
        self, request: pb.ListChatroomsRequest, context: Ctx
    ) -> pb.ListChatroomsResponse:
        page = paging.page("chatrooms", request.page_size, request.page_token)
        rooms = await self.svc.list_chatrooms(visible_chatroom(caller(), ""), page)
        shown, token = paging.split(rooms, page, lambda r: (r.name,))
        return pb.ListChatroomsResponse(
            chatrooms=[codec.chatroom(r) for r in shown], next_page_token=token
        )

    @rpc
    async def SendMessage(self, request: pb.SendMessageRequest, context: Ctx) -> pb.Task:
        task = await self.svc.send(
            request.chatroom, request.role, request.text, caller(), request.request_id
        )
        return codec.task(task)

    @rpc
    async def SendMessages(  # type: ignore[override]  # read/write style, not an iterator
        self, request_iterator: object, context: Ctx
    ) -> None:
        """Each message a SendMessage of its own, run as it arrives (sends in flight
        together share a statement, as unary ones do), answered by request id."""
        by = caller()

        async def send(request: pb.SendMessageRequest) -> pb.SendResult:
            permit(by, SEND, request)
            if not request.request_id:
                raise InvalidArgument("request_id is required on SendMessages: it names the answer")
            task = await self.svc.send(
                request.chatroom, request.role, request.text, by, request.request_id
            )
            return pb.SendResult(request_id=request.request_id, task=codec.task(task))

        def refused(request: pb.SendMessageRequest, error: CallError) -> pb.SendResult:
            return pb.SendResult(request_id=request.request_id, error=error)

        await answer_each(context, send, refused)

    @rpc
    async def AwaitTask(
        self, request: pb.AwaitTaskRequest, context: Ctx
    ) -> AsyncIterator[pb.AwaitTaskResponse]:
        task = await self.svc.await_task(
            request.chatroom,
            request.role,
            request.connection_id,
            request.epoch,
            caller(),
            start=request.start,
        )
        try:
            yield pb.AwaitTaskResponse(task=codec.task(task))
        except (asyncio.CancelledError, GeneratorExit):
            # The claimer vanished between the claim and the write: give it back now.
            self.svc.delivery_failed(task)
            raise
        self.svc.delivered(task)

    @rpc
    async def StartTask(self, request: pb.TaskRef, context: Ctx) -> pb.Task:
        return codec.task(await self.svc.start_task(request.id, request.attempt, caller()))

    @rpc
    async def CompleteTask(self, request: pb.TaskRef, context: Ctx) -> pb.Task:
        return codec.task(await self.svc.complete_task(request.id, request.attempt, caller()))

    @rpc
    async def CompleteAndClaimNext(
        self, request: pb.CompleteAndClaimNextRequest, context: Ctx
    ) -> pb.CompleteAndClaimNextResponse:
        return await self._step(request, caller())

    @rpc
    async def CompleteAndClaimNextStream(  # type: ignore[override]  # read/write style
        self, request_iterator: object, context: Ctx
    ) -> None:
        """Each message a CompleteAndClaimNext of its own, answered by its task id."""
        by = caller()

        async def step(request: pb.CompleteAndClaimNextRequest) -> pb.StepResult:
            permit(by, STEP, request)
            done = await self._step(request, by)
            return pb.StepResult(id=request.id, attempt=request.attempt, done=done)

        def refused(request: pb.CompleteAndClaimNextRequest, error: CallError) -> pb.StepResult:
            return pb.StepResult(id=request.id, attempt=request.attempt, error=error)

        await answer_each(context, step, refused)

    async def _step(
        self, request: pb.CompleteAndClaimNextRequest, by: Principal
    ) -> pb.CompleteAndClaimNextResponse:
        done, taken = await self.svc.complete_and_claim_next(
            request.chatroom,
            request.role,
            request.connection_id,
            request.epoch,
            request.id,
            request.attempt,
            request.start,
            by,
        )
        return pb.CompleteAndClaimNextResponse(
            completed=codec.task(done), next=codec.task(taken) if taken is not None else None
        )

    @rpc
    async def CancelTask(self, request: pb.TaskRef, context: Ctx) -> pb.Task:
        return codec.task(await self.svc.cancel_task(request.id, caller(), request.reason))

    @rpc
    async def ReleaseTask(self, request: pb.TaskRef, context: Ctx) -> pb.Task:
        return codec.task(await self.svc.release_task(request.id, caller(), request.reason))

    @rpc
    async def GetTask(self, request: pb.GetTaskRequest, context: Ctx) -> pb.Task:
        return codec.task(await self.svc.get_task(request.id, caller()))

    @rpc
    async def TaskHistory(
        self, request: pb.TaskHistoryRequest, context: Ctx
    ) -> pb.TaskHistoryResponse:
        items = await self.svc.history(request.id, caller())
        return pb.TaskHistoryResponse(transitions=[codec.transition(t) for t in items])

    @rpc
    async def ListTasks(self, request: pb.ListTasksRequest, context: Ctx) -> pb.ListTasksResponse:
        chatroom = visible_chatroom(caller(), request.chatroom) or ""
        status = codec.optional_enum(TaskStatus, request.status, "status")
        page = paging.page("tasks", request.page_size, request.page_token)
        tasks = await self.svc.list_tasks(chatroom, status, page)
        shown, token = paging.split(tasks, page, lambda t: (t.created_at, t.id))
        return pb.ListTasksResponse(tasks=[codec.task(t) for t in shown], next_page_token=token)

    @rpc
    async def CountTasks(
        self, request: pb.CountTasksRequest, context: Ctx
    ) -> pb.CountTasksResponse:
        chatroom = visible_chatroom(caller(), request.chatroom) or ""
        counts, attention = await self.svc.count_tasks(chatroom)
        return pb.CountTasksResponse(
            counts=[
                pb.CountTasksResponse.StatusCount(status=s.to_pb(), count=counts.get(s, 0))
                for s in TaskStatus
            ],
            needs_attention=attention,
        )

    @rpc
    async def ListNotifications(
        self, request: pb.ListNotificationsRequest, context: Ctx
    ) -> pb.ListNotificationsResponse:
        page = paging.page("notifications", request.page_size, request.page_token)
        items = await self.svc.list_notifications(
            request.after_id, page, request.newest_first, visible_chatroom(caller(), "")
        )
        shown, token = paging.split(items, page, lambda n: (n.id,))
        return pb.ListNotificationsResponse(
            notifications=[codec.notification(n) for n in shown], next_page_token=token
        )

    @rpc
    async def VerifyAudit(
        self, request: pb.VerifyAuditRequest, context: Ctx
    ) -> pb.VerifyAuditResponse:
        tasks, rows, broken = await self.svc.verify_audit(request.task_id)
        reply = pb.VerifyAuditResponse(
            ok=broken is None, tasks_checked=tasks, transitions_checked=rows
        )
        if broken is not None:
            reply.broken_task_id = broken.task_id
            reply.broken_transition_id = broken.transition_id
            reply.problem = broken.problem
        return reply

    @rpc
    async def WatchNotifications(
        self, request: pb.WatchNotificationsRequest, context: Ctx
    ) -> AsyncIterator[pb.Notification]:
        chatroom = visible_chatroom(caller(), "")
        async for n in self.svc.watch_notifications(request.after_id, chatroom):
            yield codec.notification(n)
