"""The task FSM: every (status, trigger) pair, the attempt flags, and the SQL copy of the
rule table."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from vigil.core.errors import FailedPrecondition, InvalidArgument
from vigil.core.vocab import TaskStatus
from vigil.task_service import fsm

MIGRATIONS = Path(fsm.__file__).with_name("migrations")

# The intended machine, written out independently of fsm.RULES so a changed rule is
# caught here rather than silently agreed with.
EXPECTED: dict[tuple[str, str], str] = {
    ("pending", "claimTask"): "acknowledged",
    ("acknowledged", "startTask"): "in_progress",
    ("in_progress", "completeTask"): "completed",
    ("acknowledged", "completeTask"): "completed",
    ("pending", "cancelTask"): "closed",
    ("queued", "cancelTask"): "closed",
    ("acknowledged", "cancelTask"): "closed",
    ("in_progress", "cancelTask"): "closed",
    ("queued", "promoteNextTask"): "pending",
    ("acknowledged", "recoverStuckAcknowledged"): "pending",
    ("in_progress", "recoverOrphaned"): "pending",
    ("acknowledged", "releaseTask"): "pending",
    ("in_progress", "releaseTask"): "pending",
}
STATUSES = ["pending", "acknowledged", "in_progress", "completed", "queued", "closed"]
TRIGGERS = [
    "claimTask",
    "startTask",
    "completeTask",
    "cancelTask",
    "promoteNextTask",
    "recoverStuckAcknowledged",
    "recoverOrphaned",
    "releaseTask",
]


def test_statuses_and_triggers_are_the_declared_ones() -> None:
    assert set(fsm.STATUSES) == set(STATUSES)
    assert set(fsm.TRIGGERS) == set(TRIGGERS)
    assert {(r.from_status, r.trigger): r.to_status for r in fsm.RULES} == EXPECTED
    assert len(fsm.RULES) == len(EXPECTED)


@pytest.mark.parametrize(("status", "trigger"), list(itertools.product(STATUSES, TRIGGERS)))
def test_every_status_trigger_pair(status: str, trigger: str) -> None:
    target = EXPECTED.get((status, trigger))
    if target is not None:
        assert fsm.transition(status, trigger) == target
        return
    valid = sorted(t for (s, t) in EXPECTED if s == status)
    with pytest.raises(FailedPrecondition) as info:
        fsm.transition(status, trigger)
    message = str(info.value)
    assert f"cannot {trigger} a task that is {status}" in message
    assert f"valid triggers from {status}: {', '.join(valid) or 'none'}" in message


def test_refusal_message_reads_as_documented() -> None:
    with pytest.raises(FailedPrecondition) as info:
        fsm.transition("pending", "startTask")
    assert str(info.value) == (
        "cannot startTask a task that is pending; valid triggers from pending: "
        "cancelTask, claimTask"
    )


def test_unknown_trigger_is_invalid_argument_naming_known_triggers() -> None:
    with pytest.raises(InvalidArgument) as info:
        fsm.transition("pending", "finishTask")
    assert "'finishTask'" in str(info.value)
    assert ", ".join(sorted(TRIGGERS)) in str(info.value)
    with pytest.raises(InvalidArgument):
        fsm.increments_attempt("finishTask")


def test_unknown_status_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="'done'"):
        fsm.transition("done", "claimTask")
    with pytest.raises(InvalidArgument):
        fsm.valid_triggers("done")


@pytest.mark.parametrize("status", STATUSES)
def test_valid_triggers_are_sorted_and_match_the_table(status: str) -> None:
    assert fsm.valid_triggers(status) == sorted(t for (s, t) in EXPECTED if s == status)


def test_terminal_statuses_have_no_way_out() -> None:
    assert fsm.TERMINAL == {"completed", "closed"}
    for status in fsm.TERMINAL:
        assert fsm.valid_triggers(status) == []


def test_active_statuses_make_a_role_busy() -> None:
    assert fsm.ACTIVE == {"pending", "acknowledged", "in_progress"}
    assert fsm.INITIAL == {"pending", "queued"}


@pytest.mark.parametrize("trigger", TRIGGERS)
def test_only_recovery_and_release_increment_the_attempt(trigger: str) -> None:
    expected = trigger in {"recoverStuckAcknowledged", "recoverOrphaned", "releaseTask"}
    assert fsm.increments_attempt(trigger) is expected
    assert all(r.increments_attempt is expected for r in fsm.RULES if r.trigger == trigger)


def test_rule_for_returns_the_rule_with_its_attempt_flag() -> None:
    rule = fsm.rule_for("in_progress", "recoverOrphaned")
    assert rule == fsm.Rule(TaskStatus.IN_PROGRESS, TaskStatus.PENDING, "recoverOrphaned", True)


def test_rules_sql_values_renders_every_rule() -> None:
    lines = fsm.rules_sql_values().split(",\n")
    assert len(lines) == len(fsm.RULES)
    assert lines[0] == "    ('pending', 'acknowledged', 'claimTask', false)"
    assert "('in_progress', 'pending', 'releaseTask', true)" in lines[-1]


def test_the_migrations_hold_the_same_rule_table() -> None:
    # The database copy of the table is inserted by the migrations; keep them equal.
    rows = set()
    for path in sorted(MIGRATIONS.glob("*.sql")):
        for insert in re.findall(r"INSERT INTO tasks\.fsm_rules[^;]*;", path.read_text()):
            rows |= set(re.findall(r"\('(\w+)', '(\w+)', '(\w+)', (true|false)\)", insert))
    assert rows == {
        (r.from_status, r.to_status, r.trigger, "true" if r.increments_attempt else "false")
        for r in fsm.RULES
    }


def test_a_non_deterministic_table_is_refused() -> None:
    bad = (*fsm.RULES, fsm.Rule(TaskStatus.PENDING, TaskStatus.CLOSED, "claimTask"))
    with pytest.raises(ValueError, match="two rules for claimTask from pending"):
        fsm._index(bad)


def test_a_rule_leaving_a_terminal_status_is_refused() -> None:
    with pytest.raises(ValueError, match="terminal"):
        fsm._index((fsm.Rule(TaskStatus.CLOSED, TaskStatus.PENDING, "reopenTask"),))


def test_rules_for_one_trigger_must_agree_on_the_attempt() -> None:
    bad = (
        fsm.Rule(TaskStatus.PENDING, TaskStatus.CLOSED, "cancelTask"),
        fsm.Rule(TaskStatus.QUEUED, TaskStatus.CLOSED, "cancelTask", increments_attempt=True),
    )
    with pytest.raises(ValueError, match="disagree"):
        fsm._index(bad)
