"""The task service as a component a server hosts: the Tasks, Machines and Tokens APIs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from datetime import timedelta

import grpc
from prometheus_client import CollectorRegistry

from vigil.client import ClientConfig
from vigil.core.aio import cancel_and_wait
from vigil.core.auth import Authenticator
from vigil.core.auth.principal import SYSTEM
from vigil.core.clock import Clock
from vigil.core.db import Database
from vigil.core.errors import StorageError
from vigil.core.migrations import Migration, discover
from vigil.core.timings import Timings
from vigil.core.vocab import TokenKind
from vigil.task_service.agents_store import AgentStore
from vigil.task_service.machines_servicer import SERVICE_NAME as MACHINES_SERVICE_NAME
from vigil.task_service.machines_servicer import MachinesServicer
from vigil.task_service.metrics import TaskMetrics
from vigil.task_service.service import TaskService
from vigil.task_service.servicer import SERVICE_NAME, TasksServicer
from vigil.task_service.store import MIGRATIONS, TaskStore
from vigil.task_service.tokens_servicer import SERVICE_NAME as TOKENS_SERVICE_NAME
from vigil.task_service.tokens_servicer import TokensServicer
from vigil.v1 import machines_pb2_grpc as mpb_grpc
from vigil.v1 import tasks_pb2_grpc as pb_grpc
from vigil.v1 import tokens_pb2_grpc as tkpb_grpc

log = logging.getLogger(__name__)

# The task service follows presence with a read-only credential of its own, renewed
# well before it expires.
FOLLOWER_TOKEN_TTL = timedelta(days=1)
FOLLOWER_TOKEN_RENEW_S = 6 * 3600


def migrations() -> list[Migration]:
    return discover("tasks", MIGRATIONS)


class TaskApp:
    service_names = [SERVICE_NAME, MACHINES_SERVICE_NAME, TOKENS_SERVICE_NAME]

    def __init__(
        self,
        db: Database,
        auth: Authenticator,
        liveness: ClientConfig,
        timings: Timings,
        clock: Clock,
        registry: CollectorRegistry,
        replica_id: str = "",
    ) -> None:
        self.store = TaskStore(db)
        self.auth = auth
        self.clock = clock
        self.replica_id = replica_id
        self.metrics = TaskMetrics(registry)
        self.svc = TaskService(
            self.store,
            AgentStore(db),
            auth.store,
            db.url,
            liveness,
            timings,
            clock,
            self.metrics,
            on_revoked=auth.forget,
        )
        self._renewal: asyncio.Task[None] | None = None

    def set_liveness_addr(self, addr: str) -> None:
        """The liveness service to follow (known once a shared server has bound its port)."""
        self.svc.presence.follow(addr)

    def register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_TasksServicer_to_server(TasksServicer(self.svc, self.auth), server)
        mpb_grpc.add_MachinesServicer_to_server(
            MachinesServicer(self.svc.agents, self.auth), server
        )
        tkpb_grpc.add_TokensServicer_to_server(
            TokensServicer(self.auth.store, self.auth, self.clock), server
        )

    async def start(self) -> None:
        await self._follower_credential()
        self._renewal = asyncio.create_task(self._renew(), name="follower-credential")
        await self.svc.start()

    async def _follower_credential(self) -> None:
        old = self.svc.presence.config.token
        _record, secret = await self.auth.store.create(
            TokenKind.READONLY,
            f"task-service {self.replica_id}".strip(),
            SYSTEM,
            expires_at=self.clock.now() + FOLLOWER_TOKEN_TTL,
        )
        self.svc.presence.config = replace(self.svc.presence.config, token=secret)
        if old:
            # The follower reconnects with the new one when its stream next breaks; the
            # old one simply expires.
            log.info("renewed the task service's presence credential")

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(FOLLOWER_TOKEN_RENEW_S)
            with contextlib.suppress(StorageError):
                await self._follower_credential()

    async def drain(self) -> None:
        # Our own watch of the liveness service must not hold the server's grace open.
        # Waiting agents simply ask again elsewhere; nothing is claimed for them yet.
        await self.svc.presence.stop()

    async def close(self) -> None:
        await cancel_and_wait(self._renewal)
        await self.svc.close()
