"""Timeout, recovery and restart policy: every branch, with an injected clock."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from vigil.core.clock import FakeClock
from vigil.core.errors import InvalidArgument
from vigil.core.timings import Timings
from vigil.core.vocab import AgentKind, NotificationKind, TaskStatus
from vigil.task_service.policy import (
    Decision,
    TaskSnapshot,
    circuit_state,
    deadline_for,
    decide_at_deadline,
    decide_on_claimer_gone,
    restart_delay,
)

T = Timings()  # the plan's defaults: pending 5 min, ack 2 min, 3 attempts
PENDING_S = T.task_pending_timeout_ms / 1000
ACK_S = T.task_ack_timeout_ms / 1000
ACK_TIMEOUT = NotificationKind.ACK_TIMEOUT
PENDING_TIMEOUT = NotificationKind.PENDING_TIMEOUT
REDELIVERY_CAP = NotificationKind.REDELIVERY_CAP


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def snapshot(clock: FakeClock, status: str, **changes: object) -> TaskSnapshot:
    """A task that entered `status` now, its deadline as the policy would set it."""
    if "role_kind" in changes:
        changes["role_kind"] = AgentKind(str(changes["role_kind"]))
    base = TaskSnapshot(
        status=TaskStatus(status),
        role_kind=AgentKind.REMOTE,
        attempt=0,
        deadline_at=deadline_for(TaskStatus(status), clock.now(), T),
        claimer_known_dead=False,
        role_has_live_participant=False,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def after(seconds: float, clock: FakeClock) -> datetime:
    clock.advance(seconds)
    return clock.now()


# --- deadline_for -------------------------------------------------------------------


def test_deadline_for_waiting_statuses(clock: FakeClock) -> None:
    now = clock.now()
    assert deadline_for(TaskStatus.PENDING, now, T) == now + timedelta(minutes=5)
    assert deadline_for(TaskStatus.ACKNOWLEDGED, now, T) == now + timedelta(minutes=2)


@pytest.mark.parametrize("status", ["in_progress", "queued", "completed", "closed"])
def test_no_clock_outside_waiting_statuses(clock: FakeClock, status: str) -> None:
    assert deadline_for(TaskStatus(status), clock.now(), T) is None


def test_deadline_for_unknown_status(clock: FakeClock) -> None:
    with pytest.raises(InvalidArgument):
        deadline_for("done", clock.now(), T)  # type: ignore[arg-type]


def test_deadline_for_follows_overridden_timings(clock: FakeClock) -> None:
    fast = Timings.from_env({"VIGIL_TASK_ACK_TIMEOUT_MS": "50"})
    assert deadline_for(TaskStatus.ACKNOWLEDGED, clock.now(), fast) == clock.now() + timedelta(
        milliseconds=50
    )


# --- before the deadline -----------------------------------------------------------


@pytest.mark.parametrize("status", ["pending", "acknowledged"])
def test_before_the_deadline_nothing_happens(clock: FakeClock, status: str) -> None:
    task = snapshot(clock, status, claimer_known_dead=True)
    decision = decide_at_deadline(task, after(1, clock), T)
    assert decision == Decision("wait", None, None, task.deadline_at, "deadline not reached")


@pytest.mark.parametrize("status", ["pending", "acknowledged"])
def test_a_waiting_task_without_deadline_gets_one(clock: FakeClock, status: str) -> None:
    task = snapshot(clock, status, deadline_at=None)
    decision = decide_at_deadline(task, clock.now(), T)
    assert decision.action == "extend"
    assert decision.next_deadline_at == deadline_for(TaskStatus(status), clock.now(), T)


@pytest.mark.parametrize("status", ["in_progress", "queued", "completed", "closed"])
def test_no_clock_action_outside_waiting_statuses(clock: FakeClock, status: str) -> None:
    # Lesson 6: even a dead claimer's in-progress task is not touched by a clock.
    task = snapshot(clock, status, claimer_known_dead=True, deadline_at=clock.now())
    decision = decide_at_deadline(task, after(3600, clock), T)
    assert decision.action == "wait"
    assert decision.trigger is None
    assert decision.next_deadline_at is None


def test_unknown_status_is_a_bug(clock: FakeClock) -> None:
    with pytest.raises(InvalidArgument):
        bad = replace(snapshot(clock, "pending"), status="done")  # type: ignore[arg-type]
        decide_at_deadline(bad, clock.now(), T)
    with pytest.raises(InvalidArgument):
        decide_on_claimer_gone(bad, clock.now(), T)


# --- pending past its timeout ------------------------------------------------------


@pytest.mark.parametrize("kind", ["remote", "custom"])
def test_pending_with_live_participant_is_rearmed(clock: FakeClock, kind: str) -> None:
    task = snapshot(clock, "pending", role_kind=kind, role_has_live_participant=True)
    now = after(PENDING_S, clock)
    decision = decide_at_deadline(task, now, T)
    assert decision.action == "extend"
    assert decision.trigger is None
    assert decision.notification_kind is None
    assert decision.next_deadline_at == now + timedelta(minutes=5)


def test_pending_remote_without_participant_restarts(clock: FakeClock) -> None:
    task = snapshot(clock, "pending", role_kind="remote")
    now = after(PENDING_S + 0.5, clock)
    decision = decide_at_deadline(task, now, T)
    assert decision.action == "restart"
    assert decision.trigger is None  # the task stays pending
    assert decision.notification_kind is None
    assert decision.next_deadline_at == now + timedelta(minutes=5)


def test_pending_custom_without_participant_notifies(clock: FakeClock) -> None:
    task = snapshot(clock, "pending", role_kind="custom")
    now = after(PENDING_S, clock)
    decision = decide_at_deadline(task, now, T)
    assert decision.action == "notify"  # never a restart for a custom agent
    assert decision.trigger is None
    assert decision.notification_kind == PENDING_TIMEOUT
    assert decision.next_deadline_at == now + timedelta(minutes=5)


# --- acknowledged past its timeout -------------------------------------------------


@pytest.mark.parametrize("kind", ["remote", "custom"])
def test_acknowledged_with_dead_claimer_is_recovered(clock: FakeClock, kind: str) -> None:
    task = snapshot(clock, "acknowledged", role_kind=kind, claimer_known_dead=True, attempt=1)
    now = after(ACK_S, clock)
    decision = decide_at_deadline(task, now, T)
    assert decision.action == "recover"
    assert decision.trigger == "recoverStuckAcknowledged"
    assert decision.notification_kind is None
    # Back to pending: it gets the pending deadline.
    assert decision.next_deadline_at == now + timedelta(minutes=5)
    assert "redelivery 2 of 3" in decision.reason


def test_acknowledged_custom_claimer_not_known_dead_is_notified(clock: FakeClock) -> None:
    # Lesson 5: a custom agent leaves after receiving its task; that is not death.
    task = snapshot(clock, "acknowledged", role_kind="custom", role_has_live_participant=False)
    now = after(ACK_S, clock)
    decision = decide_at_deadline(task, now, T)
    assert decision.action == "notify"
    assert decision.trigger is None
    assert decision.notification_kind == ACK_TIMEOUT
    assert decision.next_deadline_at == now + timedelta(minutes=2)


def test_acknowledged_remote_claimer_not_known_dead_is_extended(clock: FakeClock) -> None:
    task = snapshot(clock, "acknowledged", role_kind="remote")
    now = after(ACK_S + 10, clock)
    decision = decide_at_deadline(task, now, T)
    assert decision.action == "extend"
    assert decision.trigger is None
    assert decision.notification_kind is None
    assert decision.next_deadline_at == now + timedelta(minutes=2)


@pytest.mark.parametrize("attempt", [3, 7])
def test_acknowledged_past_the_cap_gives_up_visibly(clock: FakeClock, attempt: int) -> None:
    task = snapshot(clock, "acknowledged", claimer_known_dead=True, attempt=attempt)
    decision = decide_at_deadline(task, after(ACK_S, clock), T)
    assert decision.action == "give_up"
    assert decision.trigger is None
    assert decision.notification_kind == REDELIVERY_CAP
    assert decision.next_deadline_at is None
    assert "cap 3" in decision.reason


def test_the_last_allowed_redelivery_is_still_made(clock: FakeClock) -> None:
    task = snapshot(clock, "acknowledged", claimer_known_dead=True, attempt=2)
    assert decide_at_deadline(task, after(ACK_S, clock), T).action == "recover"


def test_redeliveries_end_at_the_cap(clock: FakeClock) -> None:
    # Replaying recovery on a claimer that dies every time: exactly max_attempts
    # redeliveries, then the task stops moving (invariant 3: no endless loop).
    task = snapshot(clock, "acknowledged", claimer_known_dead=True)
    recoveries = 0
    for _ in range(10):
        decision = decide_at_deadline(task, after(ACK_S, clock), T)
        if decision.action != "recover":
            break
        recoveries += 1
        # Redelivered, claimed again by an agent that dies: acknowledged, attempt+1.
        task = replace(
            task,
            attempt=task.attempt + 1,
            deadline_at=deadline_for(TaskStatus.ACKNOWLEDGED, clock.now(), T),
        )
    assert recoveries == T.task_max_attempts
    assert decision.action == "give_up"


# --- the event path: the claimer is known gone -------------------------------------


def test_claimer_gone_recovers_acknowledged_at_once(clock: FakeClock) -> None:
    task = snapshot(clock, "acknowledged")
    decision = decide_on_claimer_gone(task, clock.now(), T)
    assert decision.action == "recover"
    assert decision.trigger == "recoverStuckAcknowledged"
    assert decision.next_deadline_at == clock.now() + timedelta(minutes=5)


def test_claimer_gone_recovers_in_progress(clock: FakeClock) -> None:
    task = snapshot(clock, "in_progress", attempt=1)
    decision = decide_on_claimer_gone(task, clock.now(), T)
    assert decision.action == "recover"
    assert decision.trigger == "recoverOrphaned"
    assert decision.next_deadline_at == clock.now() + timedelta(minutes=5)


def test_claimer_gone_past_the_cap_gives_up(clock: FakeClock) -> None:
    task = snapshot(clock, "in_progress", attempt=3)
    decision = decide_on_claimer_gone(task, clock.now(), T)
    assert decision.action == "give_up"
    assert decision.notification_kind == REDELIVERY_CAP


@pytest.mark.parametrize("status", ["pending", "queued", "completed", "closed"])
def test_claimer_gone_leaves_unclaimed_tasks(clock: FakeClock, status: str) -> None:
    task = snapshot(clock, status)
    decision = decide_on_claimer_gone(task, clock.now(), T)
    assert decision.action == "wait"
    assert decision.trigger is None
    assert decision.next_deadline_at == task.deadline_at


# --- restart backoff ---------------------------------------------------------------


def test_restart_delay_grows_exponentially_then_caps() -> None:
    t = Timings(restart_backoff_base_ms=1_000, restart_backoff_cap_ms=10_000)
    delays = [restart_delay(n, t) for n in range(7)]
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_restart_delay_survives_a_long_crash_history() -> None:
    assert restart_delay(10_000, T) == T.restart_backoff_cap_ms / 1000
    assert restart_delay(-1, T) == 0.0


# --- circuit breaker ---------------------------------------------------------------

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return EPOCH + timedelta(seconds=seconds)


def test_circuit_closed_below_the_threshold() -> None:
    assert circuit_state([], at(0), None, T) == "closed"
    assert circuit_state([at(0), at(10)], at(20), None, T) == "closed"


def test_circuit_opens_on_n_exits_in_the_window() -> None:
    exits = [at(0), at(10), at(20)]
    assert circuit_state(exits, at(20), None, T) == "open"


def test_exits_spread_wider_than_the_window_do_not_open() -> None:
    # 3 exits, but the first is older than 5 minutes by the third.
    exits = [at(0), at(200), at(301)]
    assert circuit_state(exits, at(301), None, T) == "closed"


def test_future_exits_are_not_counted() -> None:
    exits = [at(0), at(10), at(20)]
    assert circuit_state(exits, at(15), None, T) == "closed"


def test_circuit_stays_open_through_the_cooldown() -> None:
    exits = [at(0), at(10), at(20)]
    assert circuit_state(exits, at(20), at(20), T) == "open"
    assert circuit_state(exits, at(79.999), at(20), T) == "open"


def test_circuit_half_opens_after_the_cooldown() -> None:
    exits = [at(0), at(10), at(20)]
    assert circuit_state(exits, at(80), at(20), T) == "half_open"
    assert circuit_state(exits, at(250), at(20), T) == "half_open"


def test_a_crash_of_the_half_open_attempt_reopens() -> None:
    exits = [at(0), at(10), at(20), at(90)]
    assert circuit_state(exits, at(90), at(20), T) == "open"
    # The caller records the new opening; the cool-down runs again from it.
    assert circuit_state(exits, at(149), at(90), T) == "open"
    assert circuit_state(exits, at(150), at(90), T) == "half_open"


def test_circuit_closes_once_the_opening_exits_leave_the_window() -> None:
    exits = [at(0), at(10), at(20)]
    # At 305 s the exit at 0 s is more than 5 minutes old: two remain.
    assert circuit_state(exits, at(299), at(20), T) == "half_open"
    assert circuit_state(exits, at(305), at(20), T) == "closed"


def test_an_old_opening_does_not_mute_a_new_crash_loop() -> None:
    exits = [at(0), at(10), at(20), at(5000), at(5010), at(5020)]
    assert circuit_state(exits, at(5020), at(20), T) == "open"
    assert circuit_state(exits[:4], at(5000), at(20), T) == "closed"


def test_circuit_with_millisecond_timings() -> None:
    fast = Timings.from_env(
        {
            "VIGIL_CIRCUIT_EXITS": "2",
            "VIGIL_CIRCUIT_WINDOW_MS": "100",
            "VIGIL_CIRCUIT_COOLDOWN_MS": "20",
        }
    )
    exits = [at(0), at(0.05)]
    assert circuit_state(exits, at(0.05), None, fast) == "open"
    assert circuit_state(exits, at(0.06), at(0.05), fast) == "open"
    assert circuit_state(exits, at(0.07), at(0.05), fast) == "half_open"
    assert circuit_state(exits, at(0.101), at(0.05), fast) == "closed"
