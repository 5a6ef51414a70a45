"""The task service as a component a server hosts: the Tasks and Machines APIs."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry

from vigil.client import ClientConfig
from vigil.core.clock import Clock
from vigil.core.db import Database
from vigil.core.migrations import Migration, discover
from vigil.core.timings import Timings
from vigil.task_service.agents_store import AgentStore
from vigil.task_service.machines_servicer import SERVICE_NAME as MACHINES_SERVICE_NAME
from vigil.task_service.machines_servicer import MachinesServicer
from vigil.task_service.metrics import TaskMetrics
from vigil.task_service.service import TaskService
from vigil.task_service.servicer import SERVICE_NAME, TasksServicer
from vigil.task_service.store import MIGRATIONS, TaskStore
from vigil.v1 import machines_pb2_grpc as mpb_grpc
from vigil.v1 import tasks_pb2_grpc as pb_grpc


def migrations() -> list[Migration]:
    return discover("tasks", MIGRATIONS)


class TaskApp:
    service_names = [SERVICE_NAME, MACHINES_SERVICE_NAME]

    def __init__(
        self,
        db: Database,
        liveness: ClientConfig,
        timings: Timings,
        clock: Clock,
        registry: CollectorRegistry,
    ) -> None:
        self.store = TaskStore(db)
        self.metrics = TaskMetrics(registry)
        self.svc = TaskService(
            self.store, AgentStore(db), db.url, liveness, timings, clock, self.metrics
        )

    def set_liveness_addr(self, addr: str) -> None:
        """The liveness service to follow (known once a shared server has bound its port)."""
        self.svc.presence.follow(addr)

    def register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_TasksServicer_to_server(TasksServicer(self.svc), server)
        mpb_grpc.add_MachinesServicer_to_server(MachinesServicer(self.svc.agents), server)

    async def start(self) -> None:
        await self.svc.start()

    async def drain(self) -> None:
        # Our own watch of the liveness service must not hold the server's grace open.
        # Waiting agents simply ask again elsewhere; nothing is claimed for them yet.
        await self.svc.presence.stop()

    async def close(self) -> None:
        await self.svc.close()
