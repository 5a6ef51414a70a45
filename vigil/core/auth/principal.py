"""Who is calling: a principal, the identity an RPC acts for, and the bearer-token
format. A token is `vigil_<id>_<secret>`: the id (public, shown in listings) finds the
row, and the secret is compared, as a SHA-256 hash, in constant time."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from vigil.core.vocab import TokenKind

PREFIX = "vigil_"
_TOKEN = re.compile(r"vigil_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


def new_token() -> tuple[str, str, bytes]:
    """(id, the whole bearer token, the secret's hash) of a fresh token."""
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return token_id, f"{PREFIX}{token_id}_{secret}", secret_hash(secret)


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None."""
    m = _TOKEN.fullmatch(token)
    return (m.group(1), m.group(2)) if m else None


def matches(secret: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(secret_hash(secret), stored_hash)


@dataclass(frozen=True)
class TokenRecord:
    """A token as stored (no secret)."""

    id: str
    secret_sha256: bytes
    kind: TokenKind
    name: str
    chatroom: str | None
    role: str | None
    machine: str | None
    command_id: int | None
    pid: int | None
    process_started_at: datetime | None
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    revoked_reason: str | None

    @classmethod
    def from_row(cls, row: Any) -> TokenRecord:
        return cls(
            id=row["id"],
            secret_sha256=bytes(row["secret_sha256"]),
            kind=TokenKind(row["kind"]),
            name=row["name"],
            chatroom=row["chatroom"],
            role=row["role"],
            machine=row["machine"],
            command_id=row["command_id"],
            pid=row["pid"],
            process_started_at=row["process_started_at"],
            created_by=row["created_by"],
            created_at=row["created_at"],
            expires_at=row["expires_at"],
            revoked_at=row["revoked_at"],
            revoked_reason=row["revoked_reason"],
        )

    def active(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


@dataclass(frozen=True)
class Principal:
    """The identity a call acts for. `token_id` is None for a machine that proved itself
    with its client certificate (mutual TLS)."""

    kind: TokenKind
    name: str
    token_id: str | None = None
    chatroom: str | None = None
    role: str | None = None
    machine: str | None = None
    command_id: int | None = None

    @classmethod
    def of(cls, t: TokenRecord) -> Principal:
        return cls(t.kind, t.name, t.id, t.chatroom, t.role, t.machine, t.command_id)

    @property
    def display(self) -> str:
        """How audit rows, commands and notifications name who did it."""
        if self.kind == TokenKind.AGENT:
            return f"agent:{self.chatroom}/{self.role}@{self.machine}#{self.command_id}"
        if self.kind == TokenKind.MACHINE:
            return f"machine:{self.machine}"
        if self.kind == TokenKind.CHATROOM:
            scope = f"{self.chatroom}/{self.role}" if self.role else self.chatroom
            return f"chatroom:{scope}:{self.name}"
        return f"{self.kind}:{self.name}"

    @property
    def is_admin(self) -> bool:
        return self.kind == TokenKind.ADMIN

    def covers_chatroom(self, chatroom: str) -> bool:
        """May see and act in this chatroom (operators: every chatroom)."""
        if self.kind in (TokenKind.ADMIN, TokenKind.READONLY):
            return True
        return self.kind in (TokenKind.CHATROOM, TokenKind.AGENT) and self.chatroom == chatroom

    def covers_role(self, chatroom: str, role: str) -> bool:
        """May act as this role (join it, take its tasks)."""
        if self.kind == TokenKind.ADMIN:
            return True
        if self.kind not in (TokenKind.CHATROOM, TokenKind.AGENT):
            return False
        return self.chatroom == chatroom and (self.role is None or self.role == role)

    def __str__(self) -> str:
        return self.display


# The server's own actions (timeouts, recoveries, automatic restarts).
SYSTEM = "vigil"
