"""Database roles: the owner runs migrations and grants (`roles.sql`), each service
connects as its own role with only what it needs, and `vigil_readonly` is for
dashboards, checkers and operators.

How a service reaches the database as its role:
- its own URL (`VIGIL_LIVENESS_DATABASE_URL`, `VIGIL_TASKS_DATABASE_URL`): a login of
  that role, the production set-up (docs/operations.md);
- on the embedded PostgreSQL: a login of that role over the owner-only Unix socket;
- otherwise, DATABASE_URL with `role=…` (the session takes the role as it starts: the
  service's statements run with the role's privileges; defence in depth only, since the
  session could `RESET ROLE`).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from vigil.core.errors import ConfigError, StorageError

LIVENESS = "vigil_liveness"
TASKS = "vigil_tasks"
READONLY = "vigil_readonly"
SQL = (Path(__file__).with_name("roles.sql")).read_text()


async def ensure(pool: asyncpg.Pool) -> None:
    """Create the roles if missing and (re)grant their privileges; as the owner."""
    try:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", 0x5649_4752)  # "VIGR"
            await conn.execute(SQL)
    except asyncpg.InsufficientPrivilegeError as exc:
        raise ConfigError(
            f"cannot set up Vigil's database roles as this user ({exc}): create them "
            "first (docs/operations.md, 'Database roles') or run `vigil migrate` as a role "
            "with CREATEROLE that owns Vigil's schemas"
        ) from None
    except (OSError, asyncpg.PostgresError) as exc:
        raise StorageError(f"setting up the database roles failed: {exc}") from exc


def service_url(url: str, role: str, *, login: bool) -> str:
    """The URL a service uses: a login as `role` (`login`), else `url` taking `role`
    as its session starts."""
    parts = urlsplit(url)
    if login:
        host = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit(parts._replace(netloc=f"{role}@{host}"))
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "role"] + [("role", role)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def role_of(url: str) -> str | None:
    """The role a URL asks for (the `role` parameter, else its user), if any."""
    parts = urlsplit(url)
    for k, v in parse_qsl(parts.query):
        if k == "role":
            return v
    return parts.username
