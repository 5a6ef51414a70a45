"""The task state machine: the one table of `(from, to, trigger)` rules and the pure
`transition()` over it. Nothing else decides whether a status may change.

The same table is loaded into `tasks.fsm_rules` by the schema migration, and a database
trigger refuses any status change that is not one of these rules named by the trigger
the FSM writer declared for its transaction (`vigil.fsm_trigger`). `rules_sql_values()`
renders the table as SQL so a test can hold the migration and this module together.
"""

from __future__ import annotations

from typing import NamedTuple

from vigil.core.errors import FailedPrecondition, InvalidArgument
from vigil.core.vocab import TaskStatus

PENDING = TaskStatus.PENDING
ACKNOWLEDGED = TaskStatus.ACKNOWLEDGED
IN_PROGRESS = TaskStatus.IN_PROGRESS
COMPLETED = TaskStatus.COMPLETED
QUEUED = TaskStatus.QUEUED
CLOSED = TaskStatus.CLOSED

STATUSES: tuple[TaskStatus, ...] = tuple(TaskStatus)
TERMINAL: frozenset[TaskStatus] = frozenset({COMPLETED, CLOSED})
# A role with a task in one of these is busy: a new task for it is created queued.
ACTIVE: frozenset[TaskStatus] = frozenset({PENDING, ACKNOWLEDGED, IN_PROGRESS})
# The statuses a task may be created in (the database refuses any other on INSERT).
INITIAL: frozenset[TaskStatus] = frozenset({PENDING, QUEUED})

# The SQLSTATE the database raises when it refuses a status or attempt change, so the
# storage layer can tell an FSM refusal from any other failure.
DB_REFUSED_SQLSTATE = "VG001"


class Rule(NamedTuple):
    from_status: TaskStatus
    to_status: TaskStatus
    trigger: str
    # Recovery hands the task to a new claimer: bumping the attempt fences the old one,
    # whose late start or completion then presents a stale attempt and is refused.
    increments_attempt: bool = False


RULES: tuple[Rule, ...] = (
    Rule(PENDING, ACKNOWLEDGED, "claimTask"),
    Rule(ACKNOWLEDGED, IN_PROGRESS, "startTask"),
    Rule(IN_PROGRESS, COMPLETED, "completeTask"),
    # Lesson 5: an agent may finish without ever saying it started.
    Rule(ACKNOWLEDGED, COMPLETED, "completeTask"),
    Rule(PENDING, CLOSED, "cancelTask"),
    Rule(QUEUED, CLOSED, "cancelTask"),
    Rule(ACKNOWLEDGED, CLOSED, "cancelTask"),
    Rule(IN_PROGRESS, CLOSED, "cancelTask"),
    Rule(QUEUED, PENDING, "promoteNextTask"),
    Rule(ACKNOWLEDGED, PENDING, "recoverStuckAcknowledged", increments_attempt=True),
    Rule(IN_PROGRESS, PENDING, "recoverOrphaned", increments_attempt=True),
    # Handed back by its claimer or a person: a new attempt, but not a recovery.
    Rule(ACKNOWLEDGED, PENDING, "releaseTask", increments_attempt=True),
    Rule(IN_PROGRESS, PENDING, "releaseTask", increments_attempt=True),
)


def _index(
    rules: tuple[Rule, ...],
) -> tuple[dict[tuple[TaskStatus, str], Rule], dict[str, bool]]:
    """Check the table is a function of (status, trigger) and index it."""
    by_key: dict[tuple[TaskStatus, str], Rule] = {}
    increments: dict[str, bool] = {}
    for rule in rules:
        for status in (rule.from_status, rule.to_status):
            if status not in STATUSES:
                raise ValueError(f"rule {rule} names unknown status {status!r}")
        if rule.from_status in TERMINAL:
            raise ValueError(f"rule {rule} leaves terminal status {rule.from_status!r}")
        key = (rule.from_status, rule.trigger)
        if key in by_key:
            raise ValueError(f"two rules for {rule.trigger} from {rule.from_status}")
        by_key[key] = rule
        # increments_attempt(trigger) answers per trigger, so all its rules must agree.
        if increments.setdefault(rule.trigger, rule.increments_attempt) != rule.increments_attempt:
            raise ValueError(f"rules for {rule.trigger} disagree on increments_attempt")
    return by_key, increments


_BY_KEY, _INCREMENTS = _index(RULES)
TRIGGERS: tuple[str, ...] = tuple(dict.fromkeys(rule.trigger for rule in RULES))


def _check_trigger(trigger: str) -> None:
    if trigger not in _INCREMENTS:
        raise InvalidArgument(
            f"unknown trigger {trigger!r}; known triggers: {', '.join(sorted(TRIGGERS))}"
        )


def _check_status(status: str) -> None:
    if status not in TaskStatus.values():
        raise InvalidArgument(
            f"unknown task status {status!r}; known statuses: {', '.join(TaskStatus.values())}"
        )


def valid_triggers(status: str) -> list[str]:
    """The triggers that may fire from `status`, sorted; empty for a terminal status."""
    _check_status(status)
    return sorted(trigger for (from_status, trigger) in _BY_KEY if from_status == status)


def rule_for(task_status: str, trigger: str) -> Rule:
    """The rule `trigger` follows from `task_status`.

    Raises InvalidArgument for an unknown trigger or status, and FailedPrecondition
    (naming the current status and the triggers valid from it) when the trigger does
    not apply to a task in that status.
    """
    _check_trigger(trigger)
    _check_status(task_status)
    rule = _BY_KEY.get((TaskStatus(task_status), trigger))
    if rule is None:
        valid = valid_triggers(task_status)
        raise FailedPrecondition(
            f"cannot {trigger} a task that is {task_status}; valid triggers from "
            f"{task_status}: {', '.join(valid) if valid else 'none'}"
        )
    return rule


def transition(task_status: str, trigger: str) -> TaskStatus:
    """The status a task in `task_status` moves to on `trigger` (see `rule_for`)."""
    return rule_for(task_status, trigger).to_status


def increments_attempt(trigger: str) -> bool:
    """Whether firing `trigger` moves the task to its next attempt."""
    _check_trigger(trigger)
    return _INCREMENTS[trigger]


def rules_sql_values() -> str:
    """The rule table as the rows of a SQL `VALUES` list, one rule per line, in the
    column order (from_status, to_status, trigger, increments_attempt)."""
    return ",\n".join(
        f"    ('{r.from_status.value}', '{r.to_status.value}', '{r.trigger}', "
        f"{'true' if r.increments_attempt else 'false'})"
        for r in RULES
    )
