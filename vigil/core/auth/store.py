"""Storage of the `auth` schema (tokens). Every service reads it; the task service is
its only writer (it mints, registers and revokes)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import asyncpg

from vigil.core.auth.principal import TokenRecord, new_token
from vigil.core.db import Database, mapped_errors
from vigil.core.errors import AlreadyExists
from vigil.core.paging import Page
from vigil.core.sql import load_queries
from vigil.core.vocab import TokenKind

Q = load_queries(Path(__file__).with_name("queries.sql"))
MIGRATIONS = Path(__file__).with_name("migrations")
NOTIFY_CHANNEL = "vigil_auth"

CONSTRAINTS = {
    "tokens_one_per_machine": lambda exc: AlreadyExists(
        "the machine already has a live credential; registering it again rotates it"
    ),
}


class AuthStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, token_id: str) -> TokenRecord | None:
        row = await self.db.fetchrow(Q["get_token"], token_id)
        return TokenRecord.from_row(row) if row else None

    async def inactive(self, ids: list[str], now: datetime) -> list[str]:
        """Those of `ids` whose token is unknown, revoked or expired at `now`: one
        statement, and only those rows travel (the open streams' tokens are checked
        every second, and the server's work must not grow with their number)."""
        rows = await self.db.fetch(Q["inactive_tokens"], ids, now)
        return [r["id"] for r in rows]

    async def create(
        self,
        kind: TokenKind,
        name: str,
        created_by: str,
        *,
        chatroom: str | None = None,
        role: str | None = None,
        machine: str | None = None,
        command_id: int | None = None,
        expires_at: datetime | None = None,
        conn: asyncpg.Connection | None = None,
    ) -> tuple[TokenRecord, str]:
        """A new token and its secret (the only time the secret exists outside the
        caller). Pass `conn` to create it inside a transaction of yours."""
        token_id, secret, digest = new_token()
        args = (
            token_id,
            digest,
            kind.value,
            name,
            chatroom,
            role,
            machine,
            command_id,
            created_by,
            expires_at,
        )
        async with mapped_errors(CONSTRAINTS):
            if conn is not None:
                row = await conn.fetchrow(Q["insert_token"], *args)
            else:
                row = await self.db.pool.fetchrow(Q["insert_token"], *args)
        return TokenRecord.from_row(row), secret

    async def create_with(
        self, token_id: str, digest: bytes, kind: TokenKind, name: str, created_by: str
    ) -> TokenRecord:
        """A token whose secret the operator chose (a deployment's bootstrap secret)."""
        async with mapped_errors(CONSTRAINTS):
            row = await self.db.pool.fetchrow(
                Q["insert_token"],
                token_id, digest, kind.value, name, None, None, None, None, created_by, None,
            )  # fmt: skip
        return TokenRecord.from_row(row)

    async def list_tokens(
        self,
        include_inactive: bool,
        now: datetime,
        page: Page,
    ) -> list[TokenRecord]:
        """A page of tokens, newest first."""
        rows = await self.db.fetch(
            Q["list_tokens"], include_inactive, now, page.arg(0), page.arg(1), page.fetch
        )
        return [TokenRecord.from_row(r) for r in rows]

    async def _revoke(
        self, query: str, *args: object, conn: asyncpg.Connection | None = None
    ) -> list[TokenRecord]:
        async with mapped_errors():
            if conn is not None:
                rows = await conn.fetch(Q[query], *args)
            else:
                rows = await self.db.pool.fetch(Q[query], *args)
        return [TokenRecord.from_row(r) for r in rows]

    async def revoke(self, token_id: str, now: datetime, reason: str) -> TokenRecord | None:
        revoked = await self._revoke("revoke_token", token_id, now, reason)
        return revoked[0] if revoked else None

    async def revoke_machine(
        self, machine: str, now: datetime, reason: str, conn: asyncpg.Connection | None = None
    ) -> list[TokenRecord]:
        return await self._revoke("revoke_machine", machine, now, reason, conn=conn)

    async def revoke_machine_credential(
        self, machine: str, now: datetime, reason: str, conn: asyncpg.Connection | None = None
    ) -> list[TokenRecord]:
        return await self._revoke("revoke_machine_credential", machine, now, reason, conn=conn)

    async def revoke_agent_process(
        self,
        machine: str,
        pid: int,
        started_at: datetime,
        now: datetime,
        reason: str,
        conn: asyncpg.Connection | None = None,
    ) -> list[TokenRecord]:
        return await self._revoke(
            "revoke_agent_process", machine, pid, started_at, now, reason, conn=conn
        )

    async def revoke_agent_command(
        self, command_id: int, now: datetime, reason: str, conn: asyncpg.Connection | None = None
    ) -> list[TokenRecord]:
        return await self._revoke("revoke_agent_command", command_id, now, reason, conn=conn)

    async def revoke_agents_not_running(
        self, machine: str, pids: list[int], now: datetime, reason: str
    ) -> list[TokenRecord]:
        return await self._revoke("revoke_agents_not_running", machine, pids, now, reason)

    async def bind_agent(self, command_id: int, pid: int, started_at: datetime) -> None:
        await self.db.execute(Q["bind_agent"], command_id, pid, started_at)
