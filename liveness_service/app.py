"""The liveness service as a component a server hosts."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry

from vigil.core.auth import Authenticator
from vigil.core.clock import Clock
from vigil.core.db import Database
from vigil.core.limits import Limits
from vigil.core.migrations import Migration, discover
from vigil.core.timings import Timings
from vigil.liveness_service.metrics import LivenessMetrics
from vigil.liveness_service.service import Liveness
from vigil.liveness_service.servicer import SERVICE_NAME, LivenessServicer
from vigil.liveness_service.store import MIGRATIONS, LivenessStore
from vigil.v1 import liveness_pb2_grpc as pb_grpc


def migrations() -> list[Migration]:
    return discover("liveness", MIGRATIONS)


class LivenessApp:
    service_names = [SERVICE_NAME]

    def __init__(
        self,
        db: Database,
        auth: Authenticator,
        timings: Timings,
        clock: Clock,
        registry: CollectorRegistry,
        limits: Limits | None = None,
    ) -> None:
        self.store = LivenessStore(db)
        self.metrics = LivenessMetrics(registry)
        self.auth = auth
        limits = limits or Limits()
        self.live = Liveness(
            self.store, db.url, timings, clock, self.metrics, limits.participants_per_token
        )
        auth.on_revoked(self.live.token_revoked)

    @property
    def store_ok(self) -> bool:
        """Whether the store answers (the server's health follows it)."""
        return self.live.store_ok

    def register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_LivenessServicer_to_server(LivenessServicer(self.live, self.auth), server)

    async def start(self) -> None:
        await self.live.start()

    async def drain(self) -> None:
        await self.live.drain()

    async def close(self) -> None:
        await self.live.close()
