"""gRPC adapter of the task service: decode, call `TaskService`, encode."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc

from vigil.core.errors import grpc_errors
from vigil.core.vocab import TaskStatus
from vigil.task_service import codec
from vigil.task_service.service import TaskService
from vigil.v1 import tasks_pb2 as pb
from vigil.v1 import tasks_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Tasks"].full_name

Ctx: TypeAlias = grpc.aio.ServicerContext


class TasksServicer(pb_grpc.TasksServicer):
    def __init__(self, svc: TaskService) -> None:
        self.svc = svc

    @grpc_errors
    async def CreateChatroom(self, request: pb.CreateChatroomRequest, context: Ctx) -> pb.Chatroom:
        room = await self.svc.create_chatroom(
            request.name, [codec.role_from_pb(r) for r in request.roles]
        )
        return codec.chatroom(room)

    @grpc_errors
    async def GetChatroom(self, request: pb.GetChatroomRequest, context: Ctx) -> pb.Chatroom:
        return codec.chatroom(await self.svc.get_chatroom(request.name))

    @grpc_errors
    async def ListChatrooms(
        self, request: pb.ListChatroomsRequest, context: Ctx
    ) -> pb.ListChatroomsResponse:
        rooms = await self.svc.list_chatrooms()
        return pb.ListChatroomsResponse(chatrooms=[codec.chatroom(r) for r in rooms])

    @grpc_errors
    async def SendMessage(self, request: pb.SendMessageRequest, context: Ctx) -> pb.Task:
        return codec.task(await self.svc.send(request.chatroom, request.role, request.text))

    @grpc_errors
    async def AwaitTask(
        self, request: pb.AwaitTaskRequest, context: Ctx
    ) -> AsyncIterator[pb.AwaitTaskResponse]:
        task = await self.svc.await_task(
            request.chatroom, request.role, request.connection_id, request.epoch
        )
        try:
            yield pb.AwaitTaskResponse(task=codec.task(task))
        except (asyncio.CancelledError, GeneratorExit):
            # The claimer vanished between the claim and the write: give it back now.
            self.svc.delivery_failed(task)
            raise
        self.svc.delivered(task)

    @grpc_errors
    async def StartTask(self, request: pb.TaskRef, context: Ctx) -> pb.Task:
        return codec.task(await self.svc.start_task(request.id, request.attempt, request.actor))

    @grpc_errors
    async def CompleteTask(self, request: pb.TaskRef, context: Ctx) -> pb.Task:
        return codec.task(await self.svc.complete_task(request.id, request.attempt, request.actor))

    @grpc_errors
    async def CancelTask(self, request: pb.TaskRef, context: Ctx) -> pb.Task:
        return codec.task(await self.svc.cancel_task(request.id, request.actor, request.reason))

    @grpc_errors
    async def ReleaseTask(self, request: pb.TaskRef, context: Ctx) -> pb.Task:
        return codec.task(await self.svc.release_task(request.id, request.actor, request.reason))

    @grpc_errors
    async def GetTask(self, request: pb.GetTaskRequest, context: Ctx) -> pb.Task:
        return codec.task(await self.svc.get_task(request.id))

    @grpc_errors
    async def TaskHistory(
        self, request: pb.TaskHistoryRequest, context: Ctx
    ) -> pb.TaskHistoryResponse:
        items = await self.svc.history(request.id)
        return pb.TaskHistoryResponse(transitions=[codec.transition(t) for t in items])

    @grpc_errors
    async def ListTasks(self, request: pb.ListTasksRequest, context: Ctx) -> pb.ListTasksResponse:
        status = codec.optional_enum(TaskStatus, request.status, "status")
        tasks = await self.svc.list_tasks(request.chatroom, status, request.limit)
        return pb.ListTasksResponse(tasks=[codec.task(t) for t in tasks])

    @grpc_errors
    async def CountTasks(
        self, request: pb.CountTasksRequest, context: Ctx
    ) -> pb.CountTasksResponse:
        counts, attention = await self.svc.count_tasks(request.chatroom)
        return pb.CountTasksResponse(
            counts=[
                pb.CountTasksResponse.StatusCount(status=s.to_pb(), count=counts.get(s, 0))
                for s in TaskStatus
            ],
            needs_attention=attention,
        )

    @grpc_errors
    async def ListNotifications(
        self, request: pb.ListNotificationsRequest, context: Ctx
    ) -> pb.ListNotificationsResponse:
        items = await self.svc.list_notifications(
            request.after_id, request.limit, request.newest_first
        )
        return pb.ListNotificationsResponse(notifications=[codec.notification(n) for n in items])

    @grpc_errors
    async def WatchNotifications(
        self, request: pb.WatchNotificationsRequest, context: Ctx
    ) -> AsyncIterator[pb.Notification]:
        async for n in self.svc.watch_notifications(request.after_id):
            yield codec.notification(n)
