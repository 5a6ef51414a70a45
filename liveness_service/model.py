"""Liveness domain values: participants, presence events and the closed vocabularies."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

KINDS = ("remote", "custom")
OFFLINE_REASONS = (
    "left",
    "task_received",
    "signal",
    "error",
    "stream_dropped",
    "ttl_expired",
    "superseded",
)
# Reasons a client may give when it leaves; the rest are the server's to record.
CLIENT_LEAVE_REASONS = ("left", "task_received", "signal", "error")

Key = tuple[str, str]  # (chatroom, role)


@dataclass(frozen=True)
class Participant:
    chatroom: str
    role: str
    kind: str
    status: str
    epoch: int
    connection_id: str
    ready_until: datetime | None
    joined_at: datetime
    offline_at: datetime | None
    offline_reason: str | None
    revision: int

    @property
    def key(self) -> Key:
        return (self.chatroom, self.role)

    @property
    def live(self) -> bool:
        return self.status == "live"

    @classmethod
    def from_row(cls, row: Any) -> Participant:
        return cls(
            chatroom=row["chatroom"],
            role=row["role"],
            kind=row["kind"],
            status=row["status"],
            epoch=row["epoch"],
            connection_id=str(row["connection_id"]),
            ready_until=row["ready_until"],
            joined_at=row["joined_at"],
            offline_at=row["offline_at"],
            offline_reason=row["offline_reason"],
            revision=row["revision"],
        )


@dataclass(frozen=True)
class PresenceEvent:
    revision: int
    type: str  # joined | resumed | offline
    at: datetime
    participant: Participant

    @classmethod
    def from_row(cls, row: Any) -> PresenceEvent:
        return cls(
            revision=row["revision"],
            type=row["type"],
            at=row["at"],
            participant=Participant.from_row(row),
        )
