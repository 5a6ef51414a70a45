"""Running Vigil's services: `vigil up` (everything, one process, one address; the
embedded PostgreSQL by default) and `vigil liveness serve` / `vigil task-service serve`
(one service, against a shared DATABASE_URL); `vigil migrate [--status]`.

A server on the embedded PostgreSQL owns it (see vigil.core.embedded): it starts or
adopts it, stops it when it exits, and refuses to start (exit 2) while another process
owns the same data folder. `vigil migrate` attaches to a running one instead."""

from __future__ import annotations

import asyncio
import faulthandler
import json
import logging
import sys
from pathlib import Path

import asyncpg

from vigil.client import ClientConfig
from vigil.core import logs, migrations
from vigil.core.config import Settings
from vigil.core.db import resolve_url
from vigil.core.embedded import DataDirBusy, EmbeddedPostgres
from vigil.core.errors import ConfigError, StorageError
from vigil.core.server import start_metrics, steady_gc, wait_for_signal
from vigil.core.timefmt import rfc3339
from vigil.server import ADMIN_TOKEN_FILE, SERVICES, all_migrations, running, service_database_url
from vigil.server import migrate as vigil_migrate

log = logging.getLogger("vigil")

# A graceful shutdown takes the grace (5 s) and a few seconds more; past this it hangs.
SHUTDOWN_DUMP_S = 45.0


async def serve(
    settings: Settings, services: tuple[str, ...] = SERVICES, *, ui: bool = False
) -> int:
    """Serve until SIGTERM/SIGINT. With `ui` (a terminal), draw the live view on stdout;
    logs then go to DATA_DIR/vigil.log."""
    own_urls = settings.liveness_database_url or settings.tasks_database_url
    if settings.database_url is None and own_urls:
        return await _serve(settings, services, None, ui=ui)  # migrated by `vigil migrate`
    if settings.database_url:
        return await _serve(settings, services, settings.database_url, ui=ui)
    embedded, url = await _own_embedded(settings.data_dir)
    try:
        return await _serve(settings, services, url, ui=ui)
    finally:
        await _stop_embedded(embedded)


async def _own_embedded(data_dir: Path) -> tuple[EmbeddedPostgres, str]:
    """The embedded PostgreSQL of `data_dir`, owned by this server (started, or adopted
    from an owner that was killed); refused while another process owns it."""
    pg = EmbeddedPostgres(data_dir)
    try:
        url = await asyncio.to_thread(pg.start, attach=False)
    except DataDirBusy as exc:
        who = f" (pid {exc.holder})" if exc.holder else ""
        raise ConfigError(
            f"the embedded PostgreSQL in {exc.pgdata} is owned by another process{who}, "
            "e.g. another `vigil up`: stop it, or give this server its own VIGIL_DATA_DIR "
            "or a DATABASE_URL"
        ) from None
    except Exception as exc:
        raise StorageError(
            f"could not start the embedded PostgreSQL in {data_dir}: {exc}"
        ) from None
    return pg, url


async def _stop_embedded(pg: EmbeddedPostgres) -> None:
    try:
        await asyncio.to_thread(pg.stop)
    except Exception as exc:
        raise StorageError(
            f"could not stop the embedded PostgreSQL in {pg.pgdata}: {exc}"
        ) from None


async def _refuse_newer_schema(settings: Settings, url: str | None, service: str) -> None:
    """A server that does not migrate still refuses a schema newer than it knows (one
    that migrates refuses it in `migrations.apply`)."""
    try:
        conn = await asyncpg.connect(service_database_url(settings, url, service))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return  # starting the server reports it
    try:
        applied = await migrations.read_applied(conn)
    except asyncpg.PostgresError:
        return
    finally:
        await conn.close()
    migrations.refuse_newer(applied, all_migrations())


async def _serve(
    settings: Settings, services: tuple[str, ...], url: str | None, *, ui: bool
) -> int:
    if not settings.migrate:
        await _refuse_newer_schema(settings, url, services[0])
    if url is None:
        where = "the services' own database URLs"
    elif settings.database_url:
        where = "DATABASE_URL"
    else:
        where = f"embedded PostgreSQL in {settings.data_dir}/pg"
    token_file = settings.data_dir / ADMIN_TOKEN_FILE
    async with (
        running(settings, url, services, bootstrap_file=token_file) as vigil,
        steady_gc(vigil.registry),
    ):
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
        # A shutdown that hangs says where, on stderr, instead of hanging silently: the
        # threads' stacks, and what every asyncio task still waits on.
        faulthandler.dump_traceback_later(SHUTDOWN_DUMP_S)
        asyncio.get_running_loop().call_later(SHUTDOWN_DUMP_S, _dump_tasks)
    faulthandler.cancel_dump_traceback_later()
    return 0


def _dump_tasks() -> None:
    print(f"vigil: still shutting down after {SHUTDOWN_DUMP_S:.0f} s; tasks:", file=sys.stderr)
    for task in asyncio.all_tasks():
        task.print_stack(limit=8, file=sys.stderr)
    sys.stderr.flush()


def _say(line: str) -> None:
    """A line for the operator: on stderr, or as a log record when logs are JSON (so
    that stream holds nothing but JSON); in the log file too when the live view runs."""
    if logs.is_json():
        log.info("%s", line.removeprefix("vigil: "))
        return
    print(line, file=sys.stderr, flush=True)
    log.debug("%s", line.removeprefix("vigil: "))


async def migrate(settings: Settings, *, status: bool = False, as_json: bool = False) -> int:
    """`vigil migrate`: migrations and roles, as the owner; on the embedded default too
    (attaching to the server of a running `vigil up`, or starting one for the while).
    `status`: print each migration, applied or pending, and change nothing."""
    url, embedded = await resolve_url(settings.database_url, settings.data_dir)
    try:
        if status:
            return await _migration_status(url, as_json)
        applied = await vigil_migrate(url)
    finally:
        if embedded is not None:
            await _stop_embedded(embedded)
    names = ", ".join(f"{m.service} {m.version:04d}_{m.name}" for m in applied) or "none"
    print(f"vigil: migrations applied: {names}; roles vigil_liveness, vigil_tasks and "
          "vigil_readonly granted")  # fmt: skip
    return 0


async def _migration_status(url: str, as_json: bool) -> int:
    """One line per migration: `SERVICE NNNN_NAME applied AT`, `… pending`, or
    `… unknown AT` (applied by a newer Vigil); `as_json`: a JSON array."""
    try:
        conn = await asyncpg.connect(url)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StorageError(f"cannot connect to PostgreSQL: {exc}") from None
    try:
        applied = await migrations.read_applied(conn)
    except asyncpg.PostgresError as exc:
        raise StorageError(f"cannot read the applied migrations: {exc}") from None
    finally:
        await conn.close()
    rows = migrations.status(applied, all_migrations())
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "service": r.service,
                        "version": r.version,
                        "name": r.name,
                        "status": r.state,
                        "applied_at": rfc3339(r.applied_at),
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return 0
    for r in rows:
        at = f" {rfc3339(r.applied_at)}" if r.applied_at else ""
        print(f"{r.service} {r.version:04d}_{r.name} {r.state}{at}")
    return 0


def _local(settings: Settings, port: int) -> ClientConfig:
    """How this process reaches the server it hosts (for the live view)."""
    host = settings.addr.rsplit(":", 1)[0]
    return ClientConfig.from_env(
        addr=f"{host}:{port}", data_dir=settings.data_dir, timings=settings.timings
    )
