"""A Vigil server process, assembled: the database and its migrations, the
authenticator, the services asked for, the gRPC listener (with TLS when configured)
and the bootstrap admin token. `vigil up`, `vigil liveness serve`, `vigil task-service
serve` and the test harness all start servers through `running()`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from vigil.client import ClientConfig, TlsConfig
from vigil.core import migrations, roles
from vigil.core.auth import Authenticator, AuthStore
from vigil.core.auth.principal import SYSTEM, parse, secret_hash
from vigil.core.auth.store import MIGRATIONS as AUTH_MIGRATIONS
from vigil.core.clock import Clock, SystemClock
from vigil.core.config import Settings
from vigil.core.db import Database, open_database
from vigil.core.errors import ConfigError, StorageError, Unauthenticated
from vigil.core.server import Server, Service, create_server
from vigil.core.vocab import TokenKind
from vigil.liveness_service.app import LivenessApp
from vigil.liveness_service.app import migrations as liveness_migrations
from vigil.task_service.app import TaskApp
from vigil.task_service.app import migrations as task_migrations

log = logging.getLogger("vigil")

SERVICES = ("liveness", "tasks")
ADMIN_TOKEN_FILE = "admin.token"


def all_migrations() -> list[migrations.Migration]:
    return migrations.discover("auth", AUTH_MIGRATIONS) + liveness_migrations() + task_migrations()


@dataclass
class Running:
    server: Server
    db: Database
    auth: Authenticator
    registry: CollectorRegistry
    liveness: LivenessApp | None
    tasks: TaskApp | None
    admin_token: str | None  # the bootstrap token (when this process hosts the task service)

    @property
    def port(self) -> int:
        return self.server.port


def _follower(settings: Settings) -> ClientConfig:
    """How the task service reaches the liveness service it follows: over the same TLS
    (presenting this server's own certificate under mutual TLS)."""
    follow = settings.liveness_addr or settings.addr
    tls = TlsConfig()
    if settings.tls is not None:
        client_ca = settings.tls.client_ca_file
        tls = TlsConfig(
            ca_file=Path(os.environ.get("VIGIL_TLS_CA") or settings.tls.cert_file),
            cert_file=settings.tls.cert_file if client_ca else None,
            key_file=settings.tls.key_file if client_ca else None,
            server_name=os.environ.get("VIGIL_TLS_SERVER_NAME") or None,
        )
    return ClientConfig(liveness_addr=follow, tasks_addr=follow, timings=settings.timings, tls=tls)


@contextlib.asynccontextmanager
async def running(
    settings: Settings,
    url: str | None,
    services: tuple[str, ...] = SERVICES,
    *,
    clock: Clock | None = None,
    registry: CollectorRegistry | None = None,
    pool_size: int = 20,
    bootstrap_file: Path | None = None,
    authenticator: type[Authenticator] = Authenticator,
) -> AsyncIterator[Running]:
    """Serve `services` on `settings.addr` until the block ends (then stop gracefully).
    With `bootstrap_file`, the process hosting the task service makes sure an admin token
    exists and is in that owner-only file (the local CLI finds it there). `authenticator`
    is the class that authenticates callers (benchmarks measure its cost against a
    subclass that trusts everyone; nothing else replaces it)."""
    clock = clock or SystemClock()
    registry = registry or CollectorRegistry()
    async with contextlib.AsyncExitStack() as stack:
        if settings.migrate:
            await migrate(url)
        pools: dict[str, Database] = {}
        for service in services:
            db = await open_database(
                service_database_url(settings, url, service), min_size=1, max_size=pool_size
            )
            stack.push_async_callback(db.close)
            pools[service] = db
        main = pools.get("tasks") or pools["liveness"]
        if not settings.migrate:
            await check_migrated(main)
        auth = authenticator(AuthStore(main), main.url, clock, settings.limits.streams_per_token)
        await auth.start()
        stack.push_async_callback(auth.stop)
        live = task = None
        apps: list[Service] = []
        if "liveness" in services:
            live = LivenessApp(
                pools["liveness"], auth, settings.timings, clock, registry, settings.limits
            )
            apps.append(live)
        if "tasks" in services:
            if "liveness" not in services and not settings.liveness_addr:
                raise ConfigError(
                    "VIGIL_LIVENESS_ADDR must name the liveness service when the task "
                    "service runs alone"
                )
            task = TaskApp(
                pools["tasks"], auth, _follower(settings), settings.timings, clock, registry,
                settings.replica_id,
            )  # fmt: skip
            apps.append(task)
        host = settings.addr.rsplit(":", 1)[0]

        def bound(port: int) -> None:
            if task is not None and live is not None:
                task.set_liveness_addr(f"{host}:{port}")

        admin = None
        if task is not None:
            admin = await _bootstrap(auth, settings, bootstrap_file)
        server = await create_server(
            settings.addr,
            apps,
            settings.timings,
            bound,
            tls=settings.tls,
            reflection_on=settings.reflection,
        )
        try:
            yield Running(server, main, auth, registry, live, task, admin)
        finally:
            await server.stop()


_SERVICE_ROLES = {"liveness": roles.LIVENESS, "tasks": roles.TASKS}


def service_database_url(settings: Settings, url: str | None, service: str) -> str:
    """Where `service` connects, as its own role (see `vigil.core.roles`)."""
    own = settings.liveness_database_url if service == "liveness" else settings.tasks_database_url
    if own:
        return own
    if not url:
        raise ConfigError(
            f"no database for the {service} service: set DATABASE_URL or "
            f"VIGIL_{service.upper()}_DATABASE_URL"
        )
    # On the embedded PostgreSQL (no DATABASE_URL) the role logs in over the socket.
    return roles.service_url(url, _SERVICE_ROLES[service], login=settings.database_url is None)


async def migrate(url: str | None) -> list[migrations.Migration]:
    """Apply every migration and the roles' grants, as the owner at `url`."""
    if not url:
        raise ConfigError("migrating needs DATABASE_URL (the owner of Vigil's schemas)")
    owner = await open_database(url, min_size=1, max_size=2)
    try:
        applied = await migrations.apply(owner.pool, all_migrations())
        await roles.ensure(owner.pool)
        return applied
    finally:
        await owner.close()


async def check_migrated(db: Database) -> None:
    """A server that does not migrate starts only on a database that is up to date."""
    try:
        rows = await db.fetch("SELECT service, version FROM public.vigil_migrations")
    except StorageError as exc:
        raise ConfigError(
            f"cannot read the applied migrations ({exc}): run `vigil migrate` with the "
            "owner's DATABASE_URL first"
        ) from None
    done = {(r["service"], r["version"]) for r in rows}
    missing = [
        f"{m.service} {m.version:04d}"
        for m in all_migrations()
        if (m.service, m.version) not in done
    ]
    if missing:
        raise ConfigError(
            f"the database lacks migrations ({', '.join(missing)}): run `vigil migrate` "
            "with the owner's DATABASE_URL first"
        )


async def _bootstrap(auth: Authenticator, settings: Settings, path: Path | None) -> str | None:
    """The admin token of this installation: `VIGIL_BOOTSTRAP_TOKEN` if given (created if
    missing), else the one in `path` if it still works, else a new one written there."""
    store = auth.store
    if settings.bootstrap_token:
        parsed = parse(settings.bootstrap_token)
        if parsed is None:
            raise ConfigError("VIGIL_BOOTSTRAP_TOKEN is not a Vigil token (vigil_<id>_<secret>)")
        existing = await store.get(parsed[0])
        if existing is None:
            await store.create_with(
                parsed[0], secret_hash(parsed[1]), TokenKind.ADMIN, "bootstrap", SYSTEM
            )
        return settings.bootstrap_token
    if path is None:
        return None
    try:
        token = (await asyncio.to_thread(path.read_text)).strip()
        if (await auth.principal_of(token)).kind == TokenKind.ADMIN:
            return token
    except (OSError, Unauthenticated):
        pass  # missing, unreadable or no longer valid: a new one replaces it
    _record, token = await store.create(TokenKind.ADMIN, "bootstrap", SYSTEM)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(token + "\n")
    log.info("wrote a new admin token to %s (owner-only)", path)
    return token
