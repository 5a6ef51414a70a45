"""Vigil's closed vocabularies, each defined once: the Python enum here, its proto enum
on the wire (`to_pb`/`from_pb`, by the naming rule PREFIX + NAME) and the SQL CHECK list
in the migrations (a test holds all three equal).

`from_pb` refuses UNSPECIFIED and unknown numbers with ValueError; servicers turn that
into INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import enum
from typing import Any, Self

from vigil.v1 import common_pb2, liveness_pb2, machines_pb2, tasks_pb2, tokens_pb2

# Reserved chatroom holding the machine daemons' own presence (role = machine id).
MACHINES_CHATROOM = "vigil.machines"
# Chatroom names starting with this are Vigil's own.
RESERVED_CHATROOM_PREFIX = "vigil."


class WireEnum(enum.StrEnum):
    """A vocabulary with a proto enum: member NAME <-> proto value PREFIX_NAME."""

    def to_pb(self) -> Any:
        wrapper, prefix = _WIRE[type(self)]
        return wrapper.Value(prefix + self.name)

    @classmethod
    def from_pb(cls, number: int) -> Self:
        wrapper, prefix = _WIRE[cls]
        try:
            name = wrapper.Name(number)
        except ValueError:
            raise ValueError(f"unknown {cls.__name__} number {number}") from None
        member = cls.__members__.get(name.removeprefix(prefix))
        if member is None:
            raise ValueError(f"{cls.__name__} is unspecified")
        return member

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class AgentKind(WireEnum):
    REMOTE = "remote"  # started and restarted by a machine daemon
    CUSTOM = "custom"  # run by a person; never restarted


class ParticipantStatus(WireEnum):
    LIVE = "live"
    OFFLINE = "offline"


class OfflineReason(WireEnum):
    LEFT = "left"
    TASK_RECEIVED = "task_received"
    SIGNAL = "signal"
    ERROR = "error"
    STREAM_DROPPED = "stream_dropped"
    TTL_EXPIRED = "ttl_expired"
    SUPERSEDED = "superseded"
    REVOKED = "revoked"


# The reasons a client may give when it leaves; the rest are the server's to record.
LEAVE_REASONS: frozenset[OfflineReason] = frozenset(
    {OfflineReason.LEFT, OfflineReason.TASK_RECEIVED, OfflineReason.SIGNAL, OfflineReason.ERROR}
)


class HeartbeatStatus(WireEnum):
    OK = "ok"
    REJOIN_REQUIRED = "rejoin_required"  # no longer live: join again (new epoch)
    SUPERSEDED = "superseded"  # a newer join took the role: stop


class PresenceEventType(WireEnum):
    JOINED = "joined"
    RESUMED = "resumed"
    OFFLINE = "offline"


class TaskStatus(WireEnum):
    PENDING = "pending"
    ACKNOWLEDGED = "acknowledged"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    QUEUED = "queued"
    CLOSED = "closed"


class NotificationKind(WireEnum):
    PENDING_TIMEOUT = "pending_timeout"
    ACK_TIMEOUT = "ack_timeout"
    REDELIVERY_CAP = "redelivery_cap"
    RESTART_REQUESTED = "restart_requested"
    CIRCUIT_OPEN = "circuit_open"
    COMMAND_FAILED = "command_failed"
    MACHINE_OFFLINE = "machine_offline"
    ROLE_STOPPED = "role_stopped"


class ExitClassification(WireEnum):
    """How an agent process ended; when several apply, the first wins (lesson 4)."""

    INTENTIONAL = "intentional"
    SIGNAL = "signal"
    EXITED_OK = "exited_ok"
    CRASHED = "crashed"
    DAEMON_LOST = "daemon_lost"

    @property
    def unexpected(self) -> bool:
        """Counts toward restarts and the circuit breaker."""
        return self in (
            ExitClassification.SIGNAL,
            ExitClassification.CRASHED,
            ExitClassification.DAEMON_LOST,
        )


class CommandType(WireEnum):
    START = "start"
    STOP = "stop"


class CommandStatus(WireEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DONE = "done"
    FAILED = "failed"
    EXPIRED = "expired"

    @property
    def open(self) -> bool:
        return self in (CommandStatus.PENDING, CommandStatus.DELIVERED)


# What a daemon may report for a command it was handed.
COMMAND_OUTCOMES: frozenset[CommandStatus] = frozenset(
    {CommandStatus.DONE, CommandStatus.FAILED, CommandStatus.EXPIRED}
)


class DesiredState(WireEnum):
    RUNNING = "running"
    STOPPED = "stopped"


class AgentStatus(WireEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPED = "stopped"
    CRASHED = "crashed"
    BACKOFF = "backoff"
    CIRCUIT_OPEN = "circuit_open"
    FAILED = "failed"  # its start failed or expired (status_reason says why)
    WAITING_FOR_MACHINE = "waiting_for_machine"  # a start waits for an offline machine


class TokenKind(WireEnum):
    ADMIN = "admin"  # everything
    READONLY = "readonly"  # read everything, change nothing
    CHATROOM = "chatroom"  # one chatroom (optionally one role)
    MACHINE = "machine"  # one machine's daemon
    AGENT = "agent"  # one agent process a daemon started


_WIRE: dict[type[WireEnum], tuple[Any, str]] = {
    AgentKind: (common_pb2.AgentKind, "AGENT_KIND_"),
    ParticipantStatus: (liveness_pb2.ParticipantStatus, "PARTICIPANT_STATUS_"),
    OfflineReason: (liveness_pb2.OfflineReason, "OFFLINE_REASON_"),
    HeartbeatStatus: (liveness_pb2.HeartbeatStatus, "HEARTBEAT_STATUS_"),
    PresenceEventType: (liveness_pb2.PresenceEventType, "PRESENCE_EVENT_TYPE_"),
    TaskStatus: (tasks_pb2.TaskStatus, "TASK_STATUS_"),
    NotificationKind: (tasks_pb2.NotificationKind, "NOTIFICATION_KIND_"),
    ExitClassification: (machines_pb2.ExitClassification, "EXIT_CLASSIFICATION_"),
    CommandType: (machines_pb2.CommandType, "COMMAND_TYPE_"),
    CommandStatus: (machines_pb2.CommandStatus, "COMMAND_STATUS_"),
    DesiredState: (machines_pb2.DesiredState, "DESIRED_STATE_"),
    AgentStatus: (machines_pb2.AgentStatus, "AGENT_STATUS_"),
    TokenKind: (tokens_pb2.TokenKind, "TOKEN_KIND_"),
}
