"""Translation between task-service domain values and vigil.v1 protobuf messages.
Decoding raises InvalidArgument naming the field, so a malformed request is refused
before anything is done with it."""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeVar

from google.protobuf.message import Message

from vigil.core import validation
from vigil.core.errors import InvalidArgument, quote
from vigil.core.timefmt import from_proto, to_proto
from vigil.core.vocab import AgentKind, WireEnum
from vigil.task_service.model import (
    Agent,
    Chatroom,
    Child,
    Command,
    Machine,
    Notification,
    RecordedExit,
    Role,
    Task,
    Transition,
)
from vigil.v1 import machines_pb2 as mpb
from vigil.v1 import tasks_pb2 as pb

E = TypeVar("E", bound=WireEnum)


def enum(cls: type[E], value: int, field: str) -> E:
    """A proto enum field as its vocabulary; unspecified or unknown is INVALID_ARGUMENT."""
    try:
        return cls.from_pb(value)
    except ValueError:
        names = ", ".join(cls.values())
        raise InvalidArgument(f"{field} is required: one of {names}") from None


def optional_enum(cls: type[E], value: int, field: str) -> E | None:
    """Like `enum`, but unspecified means "any" (a filter)."""
    return None if value == 0 else enum(cls, value, field)


def timestamp(msg: Message, field: str) -> datetime:
    if not msg.HasField(field):
        raise InvalidArgument(f"{field} is required")
    try:
        value = from_proto(getattr(msg, field))
    except (ValueError, OverflowError):
        raise InvalidArgument(f"{field} is out of range") from None
    return validation.moment(value, field)


def _set_times(msg: Message, obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            getattr(msg, name).CopyFrom(to_proto(value))


# -- tasks ---------------------------------------------------------------------------


def role_from_pb(r: pb.Role) -> Role:
    return Role(
        role=r.role,
        kind=enum(AgentKind, r.kind, f"role {quote(r.role)} kind"),
        machine=r.machine or None,
        harness=r.harness or None,
        command=r.command or None,
    )


def role(r: Role) -> pb.Role:
    return pb.Role(
        role=r.role,
        kind=r.kind.to_pb(),
        machine=r.machine or "",
        harness=r.harness or "",
        command=r.command or "",
    )


def chatroom(c: Chatroom) -> pb.Chatroom:
    return pb.Chatroom(
        name=c.name, roles=[role(r) for r in c.roles], created_at=to_proto(c.created_at)
    )


def task(t: Task) -> pb.Task:
    msg = pb.Task(
        id=t.id,
        chatroom=t.chatroom,
        role=t.role,
        text=t.text,
        status=t.status.to_pb(),
        attempt=t.attempt,
        assigned_to=t.assigned_to or "",
        recoveries=t.recoveries,
        needs_attention=t.needs_attention,
        created_at=to_proto(t.created_at),
        sent_by=t.sent_by,
        claimed_by=t.claimed_by or "",
    )
    _set_times(msg, t, ("acknowledged_at", "started_at", "completed_at", "deadline_at"))
    if t.completed_at is None and t.closed_at is not None:
        msg.completed_at.CopyFrom(to_proto(t.closed_at))  # when it ended, either way
    return msg


def transition(tr: Transition) -> pb.Transition:
    return pb.Transition(
        from_status=tr.from_status.to_pb(),
        to_status=tr.to_status.to_pb(),
        trigger=tr.trigger,
        actor=tr.actor,
        reason=tr.reason,
        attempt=tr.attempt,
        at=to_proto(tr.at),
    )


def notification(n: Notification) -> pb.Notification:
    return pb.Notification(
        id=n.id,
        kind=n.kind.to_pb(),
        chatroom=n.chatroom,
        role=n.role,
        task_id=n.task_id or "",
        message=n.message,
        created_at=to_proto(n.created_at),
        actor=n.actor,
    )


# -- machines --------------------------------------------------------------------------


def child_from_pb(c: mpb.Child, what: str = "child") -> Child:
    validation.name(c.chatroom, f"{what} chatroom")
    validation.name(c.role, f"{what} role")
    validation.pid(c.pid, f"{what} pid")
    return Child(c.chatroom, c.role, c.pid, timestamp(c, "started_at"))


def child(c: Child) -> mpb.Child:
    return mpb.Child(chatroom=c.chatroom, role=c.role, pid=c.pid, started_at=to_proto(c.started_at))


def machine(m: Machine, online: bool) -> mpb.Machine:
    return mpb.Machine(
        machine_id=m.machine_id,
        hostname=m.hostname,
        harnesses=list(m.harnesses),
        online=online,
        registered_at=to_proto(m.registered_at),
    )


def command(c: Command) -> mpb.Command:
    msg = mpb.Command(
        id=c.id,
        type=c.type.to_pb(),
        chatroom=c.chatroom,
        role=c.role,
        harness=c.harness or "",
        command=c.command or "",
        status=c.status.to_pb(),
        machine_id=c.machine_id,
        reason=c.reason,
        outcome_message=c.message or "",
        requested_by=c.requested_by,
        created_at=to_proto(c.created_at),
        deadline_at=to_proto(c.deadline_at),
    )
    return msg


def agent(a: Agent) -> mpb.Agent:
    msg = mpb.Agent(
        chatroom=a.chatroom,
        role=a.role,
        machine_id=a.machine_id,
        desired_state=a.desired_state.to_pb(),
        status=a.status.to_pb(),
        pid=a.pid or 0,
        restart_count=a.restart_count,
        has_last_exit=a.last_exit_at is not None,
        last_exit_signal=a.last_exit_signal or 0,
        status_reason=a.status_reason or "",
    )
    if a.last_exit_code is not None:
        msg.last_exit_code = a.last_exit_code
    if a.last_exit_classification is not None:
        msg.last_exit_classification = a.last_exit_classification.to_pb()
    _set_times(msg, a, ("last_exit_at", "next_restart_at", "last_exit_recorded_at"))
    return msg


def recorded_exit(r: RecordedExit) -> mpb.AgentExit:
    ex = r.exit
    return mpb.AgentExit(
        machine_id=r.machine_id,
        child=child(ex.child),
        has_exit_code=ex.exit_code is not None,
        exit_code=ex.exit_code or 0,
        signal=ex.signal or 0,
        classification=ex.classification.to_pb(),
        exited_at=to_proto(ex.exited_at),
        recorded_at=to_proto(r.recorded_at),
    )
