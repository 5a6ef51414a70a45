"""Task-service domain values: chatrooms, roles, tasks, transitions, notifications."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Role:
    role: str
    kind: str  # remote | custom
    machine: str | None = None
    command: str | None = None


@dataclass(frozen=True)
class Chatroom:
    name: str
    roles: tuple[Role, ...]
    created_at: datetime


@dataclass(frozen=True)
class Task:
    id: str
    chatroom: str
    role: str
    text: str
    status: str
    attempt: int
    recoveries: int
    assigned_to: str | None
    claim_epoch: int | None
    created_at: datetime
    acknowledged_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    closed_at: datetime | None
    deadline_at: datetime | None
    delivered_at: datetime | None
    claimer_dead_at: datetime | None
    needs_attention: bool

    @classmethod
    def from_row(cls, row: Any) -> Task:
        return cls(
            id=str(row["id"]),
            chatroom=row["chatroom"],
            role=row["role"],
            text=row["text"],
            status=row["status"],
            attempt=row["attempt"],
            recoveries=row["recoveries"],
            assigned_to=row["assigned_to"],
            claim_epoch=row["claim_epoch"],
            created_at=row["created_at"],
            acknowledged_at=row["acknowledged_at"],
            started_at=row["started_at"],
            completed_at=row["completed_at"],
            closed_at=row["closed_at"],
            deadline_at=row["deadline_at"],
            delivered_at=row["delivered_at"],
            claimer_dead_at=row["claimer_dead_at"],
            needs_attention=row["needs_attention"],
        )


@dataclass(frozen=True)
class Transition:
    from_status: str
    to_status: str
    trigger: str
    actor: str
    reason: str
    attempt: int
    at: datetime


@dataclass(frozen=True)
class Notification:
    id: int
    kind: str
    chatroom: str
    role: str
    task_id: str | None
    message: str
    created_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> Notification:
        return cls(
            id=row["id"],
            kind=row["kind"],
            chatroom=row["chatroom"],
            role=row["role"],
            task_id=str(row["task_id"]) if row["task_id"] else None,
            message=row["message"],
            created_at=row["created_at"],
        )
