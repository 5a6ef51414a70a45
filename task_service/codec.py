"""Translation between task-service domain values and vigil.v1 protobuf messages."""

from __future__ import annotations

from vigil.task_service.model import Chatroom, Notification, Role, Task, Transition
from vigil.v1 import tasks_pb2 as pb

KIND_TO_PB = {"remote": pb.ROLE_KIND_REMOTE, "custom": pb.ROLE_KIND_CUSTOM}
KIND_FROM_PB = {v: k for k, v in KIND_TO_PB.items()}


def role_from_pb(r: pb.Role) -> Role:
    return Role(
        role=r.role,
        kind=KIND_FROM_PB.get(r.kind, ""),
        machine=r.machine or None,
        command=r.command or None,
    )


def role(r: Role) -> pb.Role:
    return pb.Role(
        role=r.role, kind=KIND_TO_PB[r.kind], machine=r.machine or "", command=r.command or ""
    )


def chatroom(c: Chatroom) -> pb.Chatroom:
    msg = pb.Chatroom(name=c.name, roles=[role(r) for r in c.roles])
    msg.created_at.FromDatetime(c.created_at)
    return msg


def task(t: Task) -> pb.Task:
    msg = pb.Task(
        id=t.id,
        chatroom=t.chatroom,
        role=t.role,
        text=t.text,
        status=t.status,
        attempt=t.attempt,
        assigned_to=t.assigned_to or "",
        recoveries=t.recoveries,
        needs_attention=t.needs_attention,
    )
    msg.created_at.FromDatetime(t.created_at)
    for name in ("acknowledged_at", "started_at", "completed_at", "deadline_at"):
        value = getattr(t, name)
        if value is not None:
            getattr(msg, name).FromDatetime(value)
    if t.completed_at is None and t.closed_at is not None:
        msg.completed_at.FromDatetime(t.closed_at)  # when it ended, either way
    return msg


def transition(tr: Transition) -> pb.Transition:
    msg = pb.Transition(
        from_status=tr.from_status,
        to_status=tr.to_status,
        trigger=tr.trigger,
        actor=tr.actor,
        reason=tr.reason,
        attempt=tr.attempt,
    )
    msg.at.FromDatetime(tr.at)
    return msg


def notification(n: Notification) -> pb.Notification:
    msg = pb.Notification(
        id=n.id,
        kind=n.kind,
        chatroom=n.chatroom,
        role=n.role,
        task_id=n.task_id or "",
        message=n.message,
    )
    msg.created_at.FromDatetime(n.created_at)
    return msg
