"""Versioned SQL migrations, one folder per service (`NNNN_name.sql`), applied at
start-up under an advisory lock so processes starting together apply each once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from vigil.core.errors import StorageError

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x5649_4749  # "VIGI": one lock for every service's migrations


@dataclass(frozen=True)
class Migration:
    service: str
    version: int
    name: str
    sql: str


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
            done = {
                (r["service"], r["version"])
                for r in await conn.fetch("SELECT service, version FROM public.vigil_migrations")
            }
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
