"""Running Vigil's services: `vigil up` (everything, one process, one address) and
`vigil liveness serve` (one service, against a shared DATABASE_URL)."""

from __future__ import annotations

import asyncio
import logging
import sys

from prometheus_client import CollectorRegistry

from vigil.client import ClientConfig
from vigil.core import migrations
from vigil.core.clock import SystemClock
from vigil.core.config import Settings
from vigil.core.db import open_database, resolve_url
from vigil.core.errors import ConfigError
from vigil.core.server import Service, create_server, start_metrics, wait_for_signal
from vigil.liveness_service.app import LivenessApp
from vigil.liveness_service.app import migrations as liveness_migrations
from vigil.task_service.app import TaskApp
from vigil.task_service.app import migrations as task_migrations

log = logging.getLogger("vigil")

SERVICES = ("liveness", "tasks")


async def serve(
    settings: Settings, services: tuple[str, ...] = SERVICES, *, ui: bool = False
) -> int:
    """Serve until SIGTERM/SIGINT. With `ui` (a terminal), draw the live view on stdout;
    logs then go to DATA_DIR/vigil.log."""
    url, embedded = await resolve_url(settings.database_url, settings.data_dir)
    try:
        return await _serve(settings, services, url, ui=ui)
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


async def _serve(settings: Settings, services: tuple[str, ...], url: str, *, ui: bool) -> int:
    where = (
        "DATABASE_URL"
        if settings.database_url
        else f"embedded PostgreSQL in {settings.data_dir}/pg"
    )
    db = await open_database(url, max_size=20)
    try:
        await migrations.apply(db.pool, liveness_migrations() + task_migrations())
        registry = CollectorRegistry()
        clock = SystemClock()
        apps: list[Service] = []
        if "liveness" in services:
            apps.append(LivenessApp(db, settings.timings, clock, registry))
        task_app = None
        if "tasks" in services:
            if "liveness" not in services and not settings.liveness_addr:
                raise ConfigError(
                    "VIGIL_LIVENESS_ADDR must name the liveness service (HOST:PORT) when "
                    "the task service runs alone"
                )
            follow = settings.liveness_addr or settings.addr
            liveness = ClientConfig(
                liveness_addr=follow, tasks_addr=follow, timings=settings.timings
            )
            task_app = TaskApp(db, liveness, settings.timings, clock, registry)
            apps.append(task_app)
        host = settings.addr.rsplit(":", 1)[0]

        def bound(port: int) -> None:
            if task_app is not None and "liveness" in services:
                task_app.set_liveness_addr(f"{host}:{port}")

        server = await create_server(settings.addr, apps, settings.timings, bound)
        try:
            metrics_port = start_metrics(settings.metrics_addr, registry)
            mhost = settings.metrics_addr.rsplit(":", 1)[0]
            line = (
                f"vigil: serving {', '.join(services)} on {host}:{server.port} "
                f"(metrics http://{mhost}:{metrics_port}/metrics, database: {where}, "
                f"replica {settings.replica_id})"
            )
            print(line, file=sys.stderr, flush=True)
            log.info(
                "serving %s on %s:%d, metrics on %s:%d",
                ", ".join(services),
                host,
                server.port,
                mhost,
                metrics_port,
            )
            view = None
            if ui:
                from vigil.cli import live_view

                view = asyncio.create_task(live_view.run(_local(settings, server.port), line))
            sig = await wait_for_signal()
            if view is not None:
                view.cancel()
            print(f"vigil: signal {sig}: shutting down gracefully", file=sys.stderr, flush=True)
            log.info("signal %d: shutting down gracefully", sig)
        finally:
            await server.stop()
    finally:
        await db.close()
    return 0


def _local(settings: Settings, port: int) -> ClientConfig:
    """How this process reaches the server it hosts (for the live view)."""
    host = settings.addr.rsplit(":", 1)[0]
    addr = f"{host}:{port}"
    return ClientConfig.from_env(addr=addr, data_dir=settings.data_dir, timings=settings.timings)
