"""Task-service domain values: chatrooms, roles, tasks, transitions, notifications, and
the remote side: machines, their agents, the agents' exits and the commands daemons run.
Stores return these; nothing above the store sees a database row."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from vigil.core.vocab import (
    AgentKind,
    AgentStatus,
    CommandStatus,
    CommandType,
    DesiredState,
    ExitClassification,
    NotificationKind,
    TaskStatus,
)


@dataclass(frozen=True)
class Role:
    role: str
    kind: AgentKind
    machine: str | None = None
    harness: str | None = None  # remote: a name the machine's daemon maps to a program
    command: str | None = None  # remote: a free-form line (only where the machine allows)

    @classmethod
    def from_row(cls, row: Any) -> Role:
        return cls(
            row["role"], AgentKind(row["kind"]), row["machine"], row["harness"], row["command"]
        )


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
    status: TaskStatus
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
    sent_by: str = ""
    claimed_by: str | None = None  # the principal whose participant claimed it
    claimed_by_token: str | None = None  # and the credential it used

    @classmethod
    def from_row(cls, row: Any) -> Task:
        return cls(
            id=str(row["id"]),
            chatroom=row["chatroom"],
            role=row["role"],
            text=row["text"],
            status=TaskStatus(row["status"]),
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
            sent_by=row["sent_by"],
            claimed_by=row["claimed_by"],
            claimed_by_token=row["claimed_by_token"],
        )


@dataclass(frozen=True)
class Transition:
    from_status: TaskStatus
    to_status: TaskStatus
    trigger: str
    actor: str
    reason: str
    attempt: int
    at: datetime

    @classmethod
    def from_row(cls, row: Any) -> Transition:
        return cls(
            TaskStatus(row["from_status"]),
            TaskStatus(row["to_status"]),
            row["trigger"],
            row["actor"],
            row["reason"],
            row["attempt"],
            row["at"],
        )


@dataclass(frozen=True)
class Notification:
    id: int
    kind: NotificationKind
    chatroom: str
    role: str
    task_id: str | None
    message: str
    created_at: datetime
    actor: str = "vigil"

    @classmethod
    def from_row(cls, row: Any) -> Notification:
        return cls(
            id=row["id"],
            kind=NotificationKind(row["kind"]),
            chatroom=row["chatroom"],
            role=row["role"],
            task_id=str(row["task_id"]) if row["task_id"] else None,
            message=row["message"],
            created_at=row["created_at"],
            actor=row["actor"],
        )


# -- machines and remote agents ----------------------------------------------------


@dataclass(frozen=True)
class Machine:
    machine_id: str
    hostname: str
    harnesses: tuple[str, ...]
    registered_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> Machine:
        return cls(
            row["machine_id"], row["hostname"], tuple(row["harnesses"]), row["registered_at"]
        )


@dataclass(frozen=True)
class Agent:
    """A remote role's agent: what a person wants, and what the daemon reported."""

    chatroom: str
    role: str
    machine_id: str
    desired_state: DesiredState
    status: AgentStatus
    pid: int | None
    process_started_at: datetime | None
    restart_count: int
    last_exit_code: int | None
    last_exit_signal: int | None
    last_exit_classification: ExitClassification | None
    last_exit_at: datetime | None
    last_exit_recorded_at: datetime | None
    next_restart_at: datetime | None
    circuit_opened_at: datetime | None
    circuit_reset_at: datetime | None
    half_open: bool
    # Why it is in its status, when that needs saying (a failed start: the daemon's words).
    status_reason: str | None = None
    desired_at: datetime | None = None  # when a person last set the desired state

    @property
    def key(self) -> tuple[str, str]:
        return (self.chatroom, self.role)

    @classmethod
    def from_row(cls, row: Any) -> Agent:
        cls_ = row["last_exit_classification"]
        return cls(
            chatroom=row["chatroom"],
            role=row["role"],
            machine_id=row["machine_id"],
            desired_state=DesiredState(row["desired_state"]),
            status=AgentStatus(row["status"]),
            pid=row["pid"],
            process_started_at=row["process_started_at"],
            restart_count=row["restart_count"],
            last_exit_code=row["last_exit_code"],
            last_exit_signal=row["last_exit_signal"],
            last_exit_classification=ExitClassification(cls_) if cls_ else None,
            last_exit_at=row["last_exit_at"],
            last_exit_recorded_at=row["last_exit_recorded_at"],
            next_restart_at=row["next_restart_at"],
            circuit_opened_at=row["circuit_opened_at"],
            circuit_reset_at=row["circuit_reset_at"],
            half_open=row["half_open"],
            status_reason=row["status_reason"],
            desired_at=row["desired_at"],
        )


@dataclass(frozen=True)
class Command:
    id: int
    machine_id: str
    chatroom: str
    role: str
    type: CommandType
    harness: str | None
    command: str | None
    status: CommandStatus
    reason: str
    created_at: datetime
    deadline_at: datetime
    finished_at: datetime | None
    message: str | None
    requested_by: str = "vigil"

    @classmethod
    def from_row(cls, row: Any) -> Command:
        return cls(
            id=row["id"],
            machine_id=row["machine_id"],
            chatroom=row["chatroom"],
            role=row["role"],
            type=CommandType(row["type"]),
            harness=row["harness"],
            command=row["command"],
            status=CommandStatus(row["status"]),
            reason=row["reason"],
            created_at=row["created_at"],
            deadline_at=row["deadline_at"],
            finished_at=row["finished_at"],
            message=row["message"],
            requested_by=row["requested_by"],
        )


@dataclass(frozen=True)
class Child:
    """A process a daemon runs for a role: pid + start time is one incarnation."""

    chatroom: str
    role: str
    pid: int
    started_at: datetime


@dataclass(frozen=True)
class Exit:
    """A reported exit of one incarnation."""

    child: Child
    exit_code: int | None  # None: unknown, or killed by a signal
    signal: int | None
    exited_at: datetime
    classification: ExitClassification


@dataclass(frozen=True)
class RecordedExit:
    machine_id: str
    exit: Exit
    recorded_at: datetime
    id: int = 0  # its place in the record (newest: highest)

    @classmethod
    def from_row(cls, row: Any) -> RecordedExit:
        child = Child(row["chatroom"], row["role"], row["pid"], row["process_started_at"])
        ex = Exit(
            child,
            row["exit_code"],
            row["signal"],
            row["exited_at"],
            ExitClassification(row["classification"]),
        )
        return cls(row["machine_id"], ex, row["recorded_at"], row["id"])
