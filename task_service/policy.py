"""Timeout, recovery and restart policy: plain functions of a task snapshot, the time and
the reliability timings. No I/O and no clock of its own; the caller reads the clock,
applies the decision through the FSM and stores the next deadline.

What it encodes:
- a task gets a deadline only while it waits on someone (pending, acknowledged);
  in-progress work is recovered on events (a recorded exit), never on a clock (lesson 6);
- an acknowledged task is recovered only when its claimer is known dead; a live-looking
  claimer past the timeout gets its deadline extended (remote) or a person is told
  (custom), so a custom agent that left after receiving its task is not re-delivered
  the same task over and over (lesson 5);
- recovery is capped: past `task_max_attempts` redeliveries a task stays put, visibly;
- restarts back off exponentially and a crash-looping role's circuit opens.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from vigil.core.errors import InvalidArgument
from vigil.core.timings import Timings
from vigil.core.vocab import (
    AgentKind,
    AgentStatus,
    DesiredState,
    ExitClassification,
    NotificationKind,
    TaskStatus,
)
from vigil.task_service import fsm

Action = Literal["wait", "extend", "recover", "restart", "notify", "give_up"]
CircuitState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True)
class TaskSnapshot:
    """What the policy needs to know about one task, read in one go by the caller."""

    status: TaskStatus
    role_kind: AgentKind
    # Redeliveries so far: 0 on the first delivery, +1 on each recovery (see fsm.RULES).
    attempt: int
    deadline_at: datetime | None
    # Its claimer's process exit was reported, its daemon is gone, or delivery failed.
    claimer_known_dead: bool
    # Some participant of the task's role is live (waiting for work or working).
    role_has_live_participant: bool
    recoveries: int = 0


@dataclass(frozen=True)
class Decision:
    action: Action
    trigger: str | None
    notification_kind: NotificationKind | None
    # The deadline to store on the task afterwards; None means the task has no clock.
    next_deadline_at: datetime | None
    reason: str


def _ms(value: int) -> timedelta:
    return timedelta(milliseconds=value)


def deadline_for(status: TaskStatus, now: datetime, timings: Timings) -> datetime | None:
    """The deadline a task gets on entering `status` at `now`."""
    if status == fsm.PENDING:
        return now + _ms(timings.task_pending_timeout_ms)
    if status == fsm.ACKNOWLEDGED:
        return now + _ms(timings.task_ack_timeout_ms)
    if status in fsm.STATUSES:
        # in_progress waits for a recorded exit; queued waits for its turn; terminal is done.
        return None
    raise InvalidArgument(f"unknown task status {status!r}")


def _recover_or_give_up(
    task: TaskSnapshot, trigger: str, now: datetime, timings: Timings, why: str
) -> Decision:
    if task.attempt + 1 > timings.task_max_attempts:
        # Not recovered and no new deadline: the task stays where it is and a person is
        # told, instead of the same task looping between dead claimers.
        return Decision(
            "give_up",
            None,
            NotificationKind.REDELIVERY_CAP,
            None,
            f"{why}, but the task was already redelivered {task.attempt} times "
            f"(cap {timings.task_max_attempts})",
        )
    return Decision(
        "recover",
        trigger,
        None,
        deadline_for(fsm.transition(task.status, trigger), now, timings),
        f"{why}; redelivery {task.attempt + 1} of {timings.task_max_attempts}",
    )


def decide_at_deadline(task: TaskSnapshot, now: datetime, timings: Timings) -> Decision:
    """What to do with `task` when its deadline may have passed."""
    if task.status not in (fsm.PENDING, fsm.ACKNOWLEDGED):
        fsm.valid_triggers(task.status)  # an unknown status is a bug, not "no deadline"
        return Decision("wait", None, None, None, f"a {task.status} task has no deadline to act on")
    if task.deadline_at is None:
        # Lesson 1: a missing expiry must not read as "fine forever"; give it one.
        return Decision(
            "extend",
            None,
            None,
            deadline_for(task.status, now, timings),
            f"a {task.status} task had no deadline",
        )
    if now < task.deadline_at:
        # Woken early (another replica, a timer's slack): nothing is due yet.
        return Decision("wait", None, None, task.deadline_at, "deadline not reached")

    if task.status == fsm.PENDING:
        rearm = deadline_for(fsm.PENDING, now, timings)
        if task.role_has_live_participant:
            return Decision(
                "extend", None, None, rearm, "pending past its timeout, but the role is live"
            )
        if task.role_kind == AgentKind.REMOTE:
            return Decision(
                "restart", None, None, rearm, "pending past its timeout and no live participant"
            )
        return Decision(
            "notify",
            None,
            NotificationKind.PENDING_TIMEOUT,
            rearm,
            "pending past its timeout and no live participant; a custom agent is never restarted",
        )

    # Acknowledged past its timeout.
    if task.claimer_known_dead:
        return _recover_or_give_up(
            task, "recoverStuckAcknowledged", now, timings, "claimed, not started, claimer dead"
        )
    rearm = deadline_for(fsm.ACKNOWLEDGED, now, timings)
    if task.role_kind == AgentKind.CUSTOM:
        # A custom agent leaves after receiving its task: not being live proves nothing.
        return Decision(
            "notify",
            None,
            NotificationKind.ACK_TIMEOUT,
            rearm,
            "claimed, not started within the timeout, claimer not known dead",
        )
    return Decision(
        "extend",
        None,
        None,
        rearm,
        "claimed, not started within the timeout; the remote claimer is not known dead",
    )


def decide_on_claimer_gone(
    task: TaskSnapshot, now: datetime, timings: Timings, why: str = "the claimer is known gone"
) -> Decision:
    """What to do with `task` when its claimer is known to be gone (a recorded process
    exit, its daemon gone, failed delivery): the fast path, independent of any deadline.
    `why` (which process ended, how, where) goes into the audit row."""
    if task.status == fsm.ACKNOWLEDGED:
        return _recover_or_give_up(task, "recoverStuckAcknowledged", now, timings, why)
    if task.status == fsm.IN_PROGRESS:
        return _recover_or_give_up(task, "recoverOrphaned", now, timings, why)
    fsm.valid_triggers(task.status)
    return Decision(
        "wait", None, None, task.deadline_at, f"a {task.status} task has no claimer to recover"
    )


def restart_delay(unexpected_exits_in_window: int, timings: Timings) -> float:
    """Seconds to wait before restarting an agent after its latest unexpected exit:
    none before the first crash, then base, 2*base, 4*base, ... up to the cap."""
    if unexpected_exits_in_window <= 0:
        return 0.0
    # Bound the exponent so a long crash history cannot build a huge integer.
    exponent = min(unexpected_exits_in_window - 1, 62)
    delay_ms = min(timings.restart_backoff_base_ms << exponent, timings.restart_backoff_cap_ms)
    return delay_ms / 1000


def circuit_state(
    exit_times: list[datetime],
    now: datetime,
    last_opened_at: datetime | None,
    timings: Timings,
) -> CircuitState:
    """The restart circuit of one role.

    `exit_times` are the role's unexpected exits (lesson 4: intentional stops and clean
    exits are not counted by the caller); `last_opened_at` is when the caller last
    recorded the circuit opening, if ever.

    - `circuit_exits` exits within `circuit_window_ms` open the circuit;
    - it stays open for `circuit_cooldown_ms` after it opened;
    - then it is half-open (the caller allows one restart) while the exits that opened
      it are still in the window; an exit after the cool-down means that attempt
      crashed too, and the circuit is open again (the caller records the new opening);
    - once fewer than `circuit_exits` exits remain in the window it is closed.
    """
    cooldown_end = (
        None if last_opened_at is None else last_opened_at + _ms(timings.circuit_cooldown_ms)
    )
    if cooldown_end is not None and now < cooldown_end:
        return "open"
    window_start = now - _ms(timings.circuit_window_ms)
    recent = [t for t in exit_times if window_start < t <= now]
    if len(recent) < timings.circuit_exits:
        return "closed"
    if cooldown_end is None or any(t >= cooldown_end for t in recent):
        return "open"
    return "half_open"


@dataclass(frozen=True)
class ExitDecision:
    """What a recorded exit does to its agent."""

    status: AgentStatus
    next_restart_at: datetime | None  # when to restart it (backoff, or the cool-down's end)
    circuit_opened_at: datetime | None
    circuit_just_opened: bool  # (re)opened by this exit: tell a person


def failure_of(
    classification: ExitClassification, uptime_s: float, stopped_as_stuck: bool, timings: Timings
) -> str | None:
    """Why an exit counts as a failure (toward backoff and the circuit), or None.

    A crash, a kill or a lost daemon always does. A process that ended sooner than the
    minimum uptime after it started failed to start, whatever its exit code (an agent
    that exits 0 at once would otherwise be restarted on every need, for ever). And a
    process stopped because it never took work (a stuck restart) failed too. A person's
    stop, or a clean exit after a while, does not (lesson 4)."""
    if classification.unexpected:
        return str(classification)
    if classification == ExitClassification.INTENTIONAL:
        return "never took work" if stopped_as_stuck else None
    if uptime_s * 1000 < timings.agent_min_uptime_ms:
        return f"exited after {uptime_s:.1f}s (minimum uptime {timings.agent_min_uptime_ms} ms)"
    return None


def after_exit(
    failed: bool,
    desired: DesiredState,
    unexpected_exits: list[datetime],
    circuit_opened_at: datetime | None,
    now: datetime,
    timings: Timings,
) -> ExitDecision:
    """The agent's next state after its current process exited.

    An intentional stop or a clean exit leaves it stopped (lesson 4: only unexpected
    exits count toward restarts and the circuit). An unexpected exit of an agent a person
    wants running is restarted after a backoff, unless `unexpected_exits` (this one
    included, within the circuit window) open the circuit: then it waits out the
    cool-down, after which one half-open attempt is allowed.
    """
    if not failed:
        return ExitDecision(AgentStatus.STOPPED, None, circuit_opened_at, False)
    if desired != DesiredState.RUNNING:
        return ExitDecision(AgentStatus.CRASHED, None, circuit_opened_at, False)
    cooldown = _ms(timings.circuit_cooldown_ms)
    if circuit_state(unexpected_exits, now, circuit_opened_at, timings) == "open":
        opened = circuit_opened_at
        just_opened = opened is None or now >= opened + cooldown
        if just_opened:
            opened = now  # (re)opened now: the half-open attempt crashed too
        assert opened is not None
        return ExitDecision(AgentStatus.CIRCUIT_OPEN, opened + cooldown, opened, just_opened)
    delay = restart_delay(len(unexpected_exits), timings)
    return ExitDecision(AgentStatus.BACKOFF, now + timedelta(seconds=delay), None, False)
