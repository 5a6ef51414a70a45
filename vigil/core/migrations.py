"""Versioned SQL migrations, one folder per service (`NNNN_name.sql`), applied at
start-up under an advisory lock so processes starting together apply each once.

`public.vigil_migrations` records each applied (service, version). A Vigil refuses a
database on which a migration it does not know was applied (a newer Vigil migrated
it): neither applying nor serving on a schema it cannot understand (`SchemaTooNew`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg

from vigil.core.errors import FailedPrecondition, StorageError

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x5649_4749  # "VIGI": one lock for every service's migrations


@dataclass(frozen=True)
class Migration:
    service: str
    version: int
    name: str
    sql: str


class SchemaTooNew(FailedPrecondition):
    """The database has migrations applied that this Vigil does not know."""


@dataclass(frozen=True)
class Applied:
    """A row of `public.vigil_migrations`."""

    service: str
    version: int
    name: str
    applied_at: datetime


def discover(service: str, folder: Path) -> list[Migration]:
    found = []
    for path in sorted(folder.iterdir()):
        m = _FILE.match(path.name)
        if path.suffix == ".sql" and not m:
            raise ValueError(f"migration file {path} must be named NNNN_name.sql")
        if m:
            found.append(Migration(service, int(m.group(1)), m.group(2), path.read_text()))
    versions = [m.version for m in found]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migrations in {folder} must be numbered 0001, 0002, … without gaps")
    return found


async def apply(pool: asyncpg.Pool, migrations: list[Migration]) -> list[Migration]:
    """Apply the migrations not yet applied; returns those it applied."""
    applied: list[Migration] = []
    try:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS public.vigil_migrations (
                       service text NOT NULL,
                       version integer NOT NULL,
                       name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                       PRIMARY KEY (service, version))"""
            )
            rows = await read_applied(conn)
            refuse_newer(rows, migrations)
            done = {(r.service, r.version) for r in rows}
            for mig in migrations:
                if (mig.service, mig.version) in done:
                    continue
                await conn.execute(mig.sql)
                await conn.execute(
                    "INSERT INTO public.vigil_migrations (service, version, name) "
                    "VALUES ($1, $2, $3)",
                    mig.service,
                    mig.version,
                    mig.name,
                )
                applied.append(mig)
    except (OSError, asyncpg.PostgresError) as exc:
        raise StorageError(f"applying migrations failed: {exc}") from exc
    return applied


async def read_applied(conn: asyncpg.Connection) -> list[Applied]:
    """What `public.vigil_migrations` records (nothing if the table does not exist)."""
    if await conn.fetchval("SELECT to_regclass('public.vigil_migrations')") is None:
        return []
    rows = await conn.fetch(
        "SELECT service, version, name, applied_at FROM public.vigil_migrations "
        "ORDER BY service, version"
    )
    return [Applied(r["service"], r["version"], r["name"], r["applied_at"]) for r in rows]


def unknown(applied: Sequence[Applied], known: Sequence[Migration]) -> list[Applied]:
    """The applied migrations this code does not know (a newer Vigil applied them)."""
    names = {(m.service, m.version) for m in known}
    return [a for a in applied if (a.service, a.version) not in names]


def refuse_newer(applied: Sequence[Applied], known: Sequence[Migration]) -> None:
    """Raise `SchemaTooNew` (one line) if the database is ahead of this code."""
    ahead = unknown(applied, known)
    if not ahead:
        return
    at: dict[str, int] = {}
    for a in applied:
        at[a.service] = max(at.get(a.service, 0), a.version)
    latest: dict[str, int] = {}
    for m in known:
        latest[m.service] = max(latest.get(m.service, 0), m.version)
    services = sorted({a.service for a in ahead})
    schema = ", ".join(f"{s} {at[s]:04d}" for s in services)
    knows = ", ".join(
        f"{s} {latest[s]:04d}" if s in latest else f"no {s} migrations" for s in services
    )
    raise SchemaTooNew(
        f"the database schema is at {schema}, newer than this Vigil knows ({knows}): upgrade Vigil"
    )


@dataclass(frozen=True)
class Status:
    """One migration as `vigil migrate --status` shows it."""

    service: str
    version: int
    name: str
    state: str  # "applied", "pending", or "unknown" (applied by a newer Vigil)
    applied_at: datetime | None


def status(applied: Sequence[Applied], known: Sequence[Migration]) -> list[Status]:
    """Every known migration (applied or pending) and every applied one this code does
    not know, by service and version."""
    done = {(a.service, a.version): a for a in applied}
    out = [
        Status(m.service, m.version, m.name, "applied", done[(m.service, m.version)].applied_at)
        if (m.service, m.version) in done
        else Status(m.service, m.version, m.name, "pending", None)
        for m in known
    ]
    out += [
        Status(a.service, a.version, a.name, "unknown", a.applied_at)
        for a in unknown(applied, known)
    ]
    order = {s: i for i, s in enumerate(dict.fromkeys(m.service for m in known))}
    return sorted(out, key=lambda s: (order.get(s.service, len(order)), s.service, s.version))
