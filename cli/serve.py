"""Running Vigil's services: `vigil up` (everything, one process, one address; the
embedded PostgreSQL by default) and `vigil liveness serve` / `vigil task-service serve`
(one service, against a shared DATABASE_URL)."""

from __future__ import annotations

import asyncio
import logging
import sys

from vigil.client import ClientConfig
from vigil.core import logs
from vigil.core.config import Settings
from vigil.core.db import resolve_url
from vigil.core.server import start_metrics, wait_for_signal
from vigil.server import ADMIN_TOKEN_FILE, SERVICES, running
from vigil.server import migrate as vigil_migrate

log = logging.getLogger("vigil")


async def serve(
    settings: Settings, services: tuple[str, ...] = SERVICES, *, ui: bool = False
) -> int:
    """Serve until SIGTERM/SIGINT. With `ui` (a terminal), draw the live view on stdout;
    logs then go to DATA_DIR/vigil.log."""
    own_urls = settings.liveness_database_url or settings.tasks_database_url
    if settings.database_url is None and own_urls:
        return await _serve(settings, services, None, ui=ui)  # migrated by `vigil migrate`
    url, embedded = await resolve_url(settings.database_url, settings.data_dir)
    try:
        return await _serve(settings, services, url, ui=ui)
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


async def _serve(
    settings: Settings, services: tuple[str, ...], url: str | None, *, ui: bool
) -> int:
    if url is None:
        where = "the services' own database URLs"
    elif settings.database_url:
        where = "DATABASE_URL"
    else:
        where = f"embedded PostgreSQL in {settings.data_dir}/pg"
    token_file = settings.data_dir / ADMIN_TOKEN_FILE
    async with running(settings, url, services, bootstrap_file=token_file) as vigil:
        metrics_port = start_metrics(settings.metrics_addr, vigil.registry, settings.tls)
        host = settings.addr.rsplit(":", 1)[0]
        mhost = settings.metrics_addr.rsplit(":", 1)[0]
        scheme = "https" if settings.tls else "http"
        security = "TLS" if settings.tls else "plaintext"
        if settings.tls and settings.tls.client_ca_file:
            security = "mutual TLS"
        line = (
            f"vigil: serving {', '.join(services)} on {host}:{vigil.port} ({security}; "
            f"metrics {scheme}://{mhost}:{metrics_port}/metrics, database: {where}, "
            f"replica {settings.replica_id})"
        )
        _say(line)
        if vigil.admin_token is not None and not settings.bootstrap_token:
            _say(f"vigil: admin token in {token_file} (owner-only; the CLI on this host finds it)")
        if settings.insecure and settings.tls is None:
            log.warning(
                "serving plaintext on %s (--insecure): anyone on the path can read it", host
            )
        view = None
        if ui:
            from vigil.cli import live_view

            view = asyncio.create_task(live_view.run(_local(settings, vigil.port), line))
        sig = await wait_for_signal()
        if view is not None:
            view.cancel()
        _say(f"vigil: signal {sig}: shutting down gracefully")
    return 0


def _say(line: str) -> None:
    """A line for the operator: on stderr, or as a log record when logs are JSON (so
    that stream holds nothing but JSON); in the log file too when the live view runs."""
    if logs.is_json():
        log.info("%s", line.removeprefix("vigil: "))
        return
    print(line, file=sys.stderr, flush=True)
    log.debug("%s", line.removeprefix("vigil: "))


async def migrate(settings: Settings) -> int:
    """`vigil migrate`: migrations and roles, as the owner; on the embedded default too."""
    url, embedded = await resolve_url(settings.database_url, settings.data_dir)
    try:
        applied = await vigil_migrate(url)
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
    names = ", ".join(f"{m.service} {m.version:04d}_{m.name}" for m in applied) or "none"
    print(f"vigil: migrations applied: {names}; roles vigil_liveness, vigil_tasks and "
          "vigil_readonly granted")  # fmt: skip
    return 0


def _local(settings: Settings, port: int) -> ClientConfig:
    """How this process reaches the server it hosts (for the live view)."""
    host = settings.addr.rsplit(":", 1)[0]
    return ClientConfig.from_env(
        addr=f"{host}:{port}", data_dir=settings.data_dir, timings=settings.timings
    )
