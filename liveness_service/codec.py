"""Translation between liveness domain values and the vigil.v1 protobuf messages."""

from __future__ import annotations

from vigil.core.timefmt import to_proto
from vigil.liveness_service.model import Participant, PresenceEvent
from vigil.v1 import liveness_pb2 as pb


def participant(p: Participant) -> pb.Participant:
    msg = pb.Participant(
        chatroom=p.chatroom,
        role=p.role,
        kind=p.kind.to_pb(),
        status=p.status.to_pb(),
        epoch=p.epoch,
        connection_id=p.connection_id,
        joined_at=to_proto(p.joined_at),
        revision=p.revision,
        principal=p.principal,
        token_id=p.token_id or "",
    )
    if p.live and p.ready_until is not None:
        msg.ready_until.FromDatetime(p.ready_until)
    if p.offline_at is not None:
        msg.offline_at.FromDatetime(p.offline_at)
    if p.offline_reason:
        msg.offline_reason = p.offline_reason.to_pb()
    return msg


def event(ev: PresenceEvent) -> pb.PresenceEvent:
    return pb.PresenceEvent(
        revision=ev.revision,
        type=ev.type.to_pb(),
        participant=participant(ev.participant),
        at=to_proto(ev.at),
    )
