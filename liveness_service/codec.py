"""Translation between liveness domain values and the vigil.v1 protobuf messages."""

from __future__ import annotations

from vigil.core.timefmt import to_proto
from vigil.liveness_service.model import Participant, PresenceEvent
from vigil.v1 import liveness_pb2 as pb

KIND_TO_PB = {"remote": pb.AGENT_KIND_REMOTE, "custom": pb.AGENT_KIND_CUSTOM}
KIND_FROM_PB = {v: k for k, v in KIND_TO_PB.items()}
REASON_TO_PB = {
    "left": pb.OFFLINE_REASON_LEFT,
    "task_received": pb.OFFLINE_REASON_TASK_RECEIVED,
    "signal": pb.OFFLINE_REASON_SIGNAL,
    "error": pb.OFFLINE_REASON_ERROR,
    "stream_dropped": pb.OFFLINE_REASON_STREAM_DROPPED,
    "ttl_expired": pb.OFFLINE_REASON_TTL_EXPIRED,
    "superseded": pb.OFFLINE_REASON_SUPERSEDED,
}
REASON_FROM_PB = {v: k for k, v in REASON_TO_PB.items()}
STATUS_TO_PB = {"live": pb.PARTICIPANT_STATUS_LIVE, "offline": pb.PARTICIPANT_STATUS_OFFLINE}
HEARTBEAT_TO_PB = {
    "ok": pb.HEARTBEAT_STATUS_OK,
    "rejoin_required": pb.HEARTBEAT_STATUS_REJOIN_REQUIRED,
    "superseded": pb.HEARTBEAT_STATUS_SUPERSEDED,
}
EVENT_TO_PB = {
    "joined": pb.PRESENCE_EVENT_TYPE_JOINED,
    "resumed": pb.PRESENCE_EVENT_TYPE_RESUMED,
    "offline": pb.PRESENCE_EVENT_TYPE_OFFLINE,
}


def kind_from_pb(value: int) -> str:
    return KIND_FROM_PB.get(value, "")  # type: ignore[call-overload]  # "" is refused by validation


def reason_from_pb(value: int) -> str:
    return REASON_FROM_PB.get(value, "")  # type: ignore[call-overload]


def participant(p: Participant) -> pb.Participant:
    msg = pb.Participant(
        chatroom=p.chatroom,
        role=p.role,
        kind=KIND_TO_PB[p.kind],
        status=STATUS_TO_PB[p.status],
        epoch=p.epoch,
        connection_id=p.connection_id,
        joined_at=to_proto(p.joined_at),
        revision=p.revision,
    )
    if p.live and p.ready_until is not None:
        msg.ready_until.FromDatetime(p.ready_until)
    if p.offline_at is not None:
        msg.offline_at.FromDatetime(p.offline_at)
    if p.offline_reason:
        msg.offline_reason = REASON_TO_PB[p.offline_reason]
    return msg


def event(ev: PresenceEvent) -> pb.PresenceEvent:
    return pb.PresenceEvent(
        revision=ev.revision,
        type=EVENT_TO_PB[ev.type],
        participant=participant(ev.participant),
        at=to_proto(ev.at),
    )
