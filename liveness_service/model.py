"""Liveness domain values: participants and presence events (their vocabularies are
in `vigil.core.vocab`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from vigil.core.vocab import AgentKind, OfflineReason, ParticipantStatus, PresenceEventType

Key = tuple[str, str]  # (chatroom, role)


@dataclass(frozen=True)
class Participant:
    chatroom: str
    role: str
    kind: AgentKind
    status: ParticipantStatus
    epoch: int
    connection_id: str
    ready_until: datetime | None
    joined_at: datetime
    offline_at: datetime | None
    offline_reason: OfflineReason | None
    revision: int
    principal: str = ""  # who holds it
    token_id: str | None = None  # the credential it was joined with

    @property
    def key(self) -> Key:
        return (self.chatroom, self.role)

    @property
    def live(self) -> bool:
        return self.status == ParticipantStatus.LIVE

    @classmethod
    def from_row(cls, row: Any) -> Participant:
        return cls(
            chatroom=row["chatroom"],
            role=row["role"],
            kind=AgentKind(row["kind"]),
            status=ParticipantStatus(row["status"]),
            epoch=row["epoch"],
            connection_id=str(row["connection_id"]),
            ready_until=row["ready_until"],
            joined_at=row["joined_at"],
            offline_at=row["offline_at"],
            offline_reason=OfflineReason(row["offline_reason"]) if row["offline_reason"] else None,
            revision=row["revision"],
            principal=row["principal"],
            token_id=row["token_id"],
        )


@dataclass(frozen=True)
class PresenceEvent:
    revision: int
    type: PresenceEventType
    at: datetime
    participant: Participant

    @classmethod
    def from_row(cls, row: Any) -> PresenceEvent:
        return cls(
            revision=row["revision"],
            type=PresenceEventType(row["type"]),
            at=row["at"],
            participant=Participant.from_row(row),
        )
