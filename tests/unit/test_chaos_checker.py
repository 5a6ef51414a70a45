"""The chaos soak's checker catches what it claims to: a recorded clean event log (a real
soak's, tests/unit/chaos_clean_events.jsonl.gz) passes, and the same log with one
violation of an invariant injected fails naming that invariant. Pure logic: no process,
no sleep."""

from __future__ import annotations

import copy
import gzip
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from chaos import checker
from chaos.checker import Record
from vigil.task_service import fsm

CLEAN = Path(__file__).with_name("chaos_clean_events.jsonl.gz")


def clean() -> list[Record]:
    with gzip.open(CLEAN, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def log() -> list[Record]:
    return clean()


def of(records: list[Record], kind: str) -> list[Record]:
    return [r for r in records if r["kind"] == kind]


def later(records: list[Record]) -> float:
    """A time after everything in the log (and after every fault's grace)."""
    return max(max(r.get("t", 0), r.get("end", 0) or 0) for r in records) + 30


def extend_run(records: list[Record], end: float) -> None:
    for r in of(records, "run"):
        r["end"] = end


def completed_task(records: list[Record]) -> tuple[str, list[Record]]:
    """A task of a remote role that went pending -> acknowledged -> in_progress ->
    completed in one attempt, and its audit rows."""
    by: dict[str, list[Record]] = {}
    for r in of(records, "transition"):
        by.setdefault(r["task"], []).append(r)
    for task, rows in sorted(by.items()):
        trig = [r["trigger"] for r in sorted(rows, key=lambda r: r["seq"])]
        if trig == ["claimTask", "startTask", "completeTask"]:
            return task, sorted(rows, key=lambda r: r["seq"])
    raise AssertionError("the clean log has no simple completed task")


def role_of_kind(records: list[Record], kind: str) -> Record:
    return next(r for r in of(records, "role") if r["role_kind"] == kind)


# -- injections: one per invariant (each returns the broken copy) --------------------


def two_open_starts(records: list[Record]) -> list[Record]:
    sample = of(records, "commands_sample")[len(of(records, "commands_sample")) // 2]
    for i in (1, 2):
        sample["commands"].append(
            {"id": 9000 + i, "type": "start", "chatroom": "chaos", "role": "r0",
             "status": "pending" if i == 1 else "delivered"}
        )  # fmt: skip
    return records


def audit_row_missing(records: list[Record]) -> list[Record]:
    _task, rows = completed_task(records)
    records.remove(rows[1])  # in_progress happened (the task completed from it) unaudited
    return records


def audit_row_not_a_rule(records: list[Record]) -> list[Record]:
    _task, rows = completed_task(records)
    rows[0]["to"] = "in_progress"  # pending -> in_progress by claimTask: no such rule
    rows[1]["from"] = "in_progress"
    return records


def audit_row_twice(records: list[Record]) -> list[Record]:
    _task, rows = completed_task(records)
    dup = copy.deepcopy(rows[1])
    dup["seq"] = rows[1]["seq"]
    records.append(dup)
    return records


def status_shown_without_row(records: list[Record]) -> list[Record]:
    task, rows = completed_task(records)
    t = rows[-1]["t"] + 5  # long after it completed, a listing shows it pending again
    records.append({"kind": "task_sample", "t": t, "t0": t, "t1": t + 0.01,
                    "tasks": [{"task": task, "status": "pending"}]})  # fmt: skip
    return records


def foreign_completion(records: list[Record]) -> list[Record]:
    _task, rows = completed_task(records)
    rows[2]["actor"] = "chatroom:chaos:intruder"
    return records


def stale_attempt_accepted(records: list[Record]) -> list[Record]:
    task, rows = completed_task(records)
    # A zombie of an older attempt completed it and was told yes.
    records.append({"kind": "client_op", "t": rows[2]["t"], "op": "complete", "task": task,
                    "attempt": rows[2]["attempt"] - 1, "accepted": True, "principal": "",
                    "why": ""})  # fmt: skip
    return records


def pending_beside_idle_live(records: list[Record]) -> list[Record]:
    role = role_of_kind(records, "custom")["role"]
    t = later(records)
    attempt = of(records, "send")[0]["attempt"]
    task = "00000000-0000-0000-0000-00000000c0de"
    actor = f"chatroom:chaos/{role}:x"
    records += [
        {"kind": "presence", "t": t, "revision": 10**9, "type": "joined", "chatroom": "chaos",
         "role": role, "epoch": 999, "status": "live", "reason": "", "principal": actor},
        {"kind": "send", "t": t + 0.1, "task": task, "chatroom": "chaos", "role": role,
         "status": "pending", "attempt": attempt},
        # claimed only 3 s later, although the participant was live and idle all along
        {"kind": "transition", "t": t + 3.1, "seq": 0, "task": task, "chatroom": "chaos",
         "role": role, "from": "pending", "to": "acknowledged", "trigger": "claimTask",
         "actor": actor, "attempt": attempt, "reason": ""},
        {"kind": "presence", "t": t + 3.11, "revision": 10**9 + 1, "type": "offline",
         "chatroom": "chaos", "role": role, "epoch": 999, "status": "offline",
         "reason": "task_received", "principal": actor},
        {"kind": "transition", "t": t + 3.3, "seq": 1, "task": task, "chatroom": "chaos",
         "role": role, "from": "acknowledged", "to": "completed", "trigger": "completeTask",
         "actor": actor, "attempt": attempt, "reason": ""},
        {"kind": "task", "t": t + 4, "task": task, "chatroom": "chaos", "role": role,
         "status": "completed", "attempt": attempt, "needs_attention": False},
    ]  # fmt: skip
    extend_run(records, t + 5)
    return records


def false_death(records: list[Record]) -> list[Record]:
    role = role_of_kind(records, "remote")["role"]
    t = later(records)
    records += [
        {"kind": "presence", "t": t, "revision": 10**9, "type": "joined", "chatroom": "chaos",
         "role": role, "epoch": 999, "status": "live", "reason": "", "principal": "p"},
        # expired with no fault anywhere near: its process was running and reachable
        {"kind": "presence", "t": t + 2, "revision": 10**9 + 1, "type": "offline",
         "chatroom": "chaos", "role": role, "epoch": 999, "status": "offline",
         "reason": "ttl_expired", "principal": "p"},
    ]  # fmt: skip
    extend_run(records, t + 3)
    return records


def slow_kill_detection(records: list[Record]) -> list[Record]:
    role = role_of_kind(records, "remote")
    t = later(records)
    records += [
        {"kind": "presence", "t": t, "revision": 10**9, "type": "joined", "chatroom": "chaos",
         "role": role["role"], "epoch": 999, "status": "live", "reason": "", "principal": "p"},
        {"kind": "fault", "t": t + 1, "end": t + 1, "fault": "agent_kill", "chatroom": "chaos",
         "role": role["role"], "machine": role["machine"], "pid": 4242, "scope": "role",
         "paused": False, "busy": False},
        # offline 400 ms after the SIGKILL (the fault window excuses the death, not the delay)
        {"kind": "presence", "t": t + 1.4, "revision": 10**9 + 1, "type": "offline",
         "chatroom": "chaos", "role": role["role"], "epoch": 999, "status": "offline",
         "reason": "stream_dropped", "principal": "p"},
    ]  # fmt: skip
    extend_run(records, t + 3)
    return records


def exit_recorded_twice(records: list[Record]) -> list[Record]:
    x = of(records, "exit")[0]
    dup = {**x, "t": x["t"] + 0.5}
    records.append(dup)
    return records


def running_after_exit(records: list[Record]) -> list[Record]:
    x = of(records, "exit")[0]
    t = x["t"] + 1
    records.append({"kind": "agents_sample", "t": t, "t0": t, "t1": t + 0.01, "agents": [
        {"chatroom": x["chatroom"], "role": x["role"], "machine": x["machine"], "pid": x["pid"],
         "status": "running", "desired": "running", "restarts": 0}]})  # fmt: skip
    return records


def declared_dead_while_alive(records: list[Record]) -> list[Record]:
    x = of(records, "exit")[0]
    t = x["t"] + 1  # /proc still shows that very incarnation after its exit was recorded
    records.append({"kind": "proc_sample", "t": t, "procs": [
        {"machine": x["machine"], "pid": x["pid"], "started_at": x["started_at"]}]})  # fmt: skip
    return records


def task_lost(records: list[Record]) -> list[Record]:
    task, _rows = completed_task(records)
    final = next(r for r in of(records, "task") if r["task"] == task)
    records.remove(final)
    return records


def task_stuck(records: list[Record]) -> list[Record]:
    task, _rows = completed_task(records)
    records[:] = [r for r in records if not (r["kind"] == "transition" and r["task"] == task)]
    for r in of(records, "task"):
        if r["task"] == task:
            r["status"] = "pending"  # never delivered, no notification
    return records


def task_made_twice(records: list[Record]) -> list[Record]:
    """A send answered UNAVAILABLE after its commit, repeated: a second task nobody sent
    (only the repeat's answer was seen)."""
    task, _rows = completed_task(records)
    final = next(r for r in of(records, "task") if r["task"] == task)
    records.append({**final, "task": "00000000-0000-4000-8000-000000000042"})
    return records


def custom_role_started(records: list[Record]) -> list[Record]:
    role = role_of_kind(records, "custom")["role"]
    t = later(records)
    records.append({"kind": "command", "t": t, "id": 9001, "type": "start", "chatroom": "chaos",
                    "role": role, "machine": "m1", "status": "done", "deadline": t + 4,
                    "requested_by": "vigil"})  # fmt: skip
    return records


def stopped_role_started(records: list[Record]) -> list[Record]:
    stop = of(records, "fault")
    s = next(f for f in stop if f["fault"] == "operator_stop")
    t = (s["t"] + s["end"]) / 2
    records.append({"kind": "command", "t": t, "id": 9001, "type": "start",
                    "chatroom": s["chatroom"], "role": s["role"], "machine": s["machine"],
                    "status": "done", "deadline": t + 4, "requested_by": "vigil"})  # fmt: skip
    return records


def started_after_deadline(records: list[Record]) -> list[Record]:
    x = next(x for x in of(records, "exit") if x["classification"] == "signal")
    # The start command that made this process had expired before the process began.
    records.append({"kind": "command", "t": x["started_at"] - 5, "id": 9001, "type": "start",
                    "chatroom": x["chatroom"], "role": x["role"], "machine": x["machine"],
                    "status": "done", "deadline": x["started_at"] - 1,
                    "requested_by": "vigil"})  # fmt: skip
    for c in of(records, "command"):  # and no later start explains it
        if c["id"] != 9001 and (c["chatroom"], c["role"]) == (x["chatroom"], x["role"]):
            if c["t"] > x["started_at"] - 5:
                c["t"] = x["started_at"] - 6
    return records


INJECTIONS: list[tuple[int, Callable[[list[Record]], list[Record]]]] = [
    (1, two_open_starts),
    (2, audit_row_missing),
    (2, audit_row_not_a_rule),
    (2, audit_row_twice),
    (2, status_shown_without_row),
    (3, foreign_completion),
    (3, stale_attempt_accepted),
    (4, pending_beside_idle_live),
    (5, false_death),
    (5, slow_kill_detection),
    (6, exit_recorded_twice),
    (6, running_after_exit),
    (6, declared_dead_while_alive),
    (7, task_lost),
    (7, task_stuck),
    (7, task_made_twice),
    (8, custom_role_started),
    (8, stopped_role_started),
    (8, started_after_deadline),
]


def test_the_recorded_clean_log_passes(log: list[Record]) -> None:
    kinds = {r["kind"] for r in log}
    # a real soak's log, with every surface in it
    assert {"transition", "presence", "agents_sample", "commands_sample", "task_sample",
            "proc_sample", "exit", "command", "fault", "send", "task", "client_op",
            "role", "run"} <= kinds  # fmt: skip
    assert checker.check(log) == []


def test_every_invariant_has_an_injection() -> None:
    assert {n for n, _ in INJECTIONS} == set(checker.INVARIANTS)


@pytest.mark.parametrize(
    ("invariant", "inject"), INJECTIONS, ids=lambda x: getattr(x, "__name__", str(x))
)
def test_an_injected_violation_fails_naming_its_invariant(
    log: list[Record], invariant: int, inject: Callable[[list[Record]], list[Record]]
) -> None:
    broken = inject(copy.deepcopy(log))
    violations = checker.check(broken)
    assert violations, f"{inject.__name__} went unnoticed"
    names = {v.name for v in violations}
    assert f"{invariant}:{checker.INVARIANTS[invariant]}" in names, names
    first = next(v for v in violations if v.invariant == invariant)
    assert first.events, "a violation carries the events that break the invariant"
    assert f"invariant {first.name}" in str(first)


def test_the_checkers_fsm_is_the_documented_one() -> None:
    """The checker's own transcription of the FSM agrees with the rule table."""
    ours = {(f, t, trig): inc for (f, t, trig), inc in checker.FSM.items()}
    theirs = {(r.from_status.value, r.to_status.value, r.trigger): r.increments_attempt
              for r in fsm.RULES}  # fmt: skip
    assert ours == theirs


def test_invariant_7_waits_for_the_end(log: list[Record]) -> None:
    broken = task_stuck(copy.deepcopy(log))
    assert not [v for v in checker.check(broken, final=False) if v.invariant == 7]


def _stuck_behind_a_stopped_role(records: list[Record], started_again: bool) -> list[Record]:
    task_stuck(records)
    stuck = next(r for r in of(records, "task") if r["status"] == "pending")
    t = later(records)
    records.append({"kind": "notification", "t": t, "id": 9002, "type": "role_stopped",
                    "chatroom": stuck["chatroom"], "role": stuck["role"], "task": ""})  # fmt: skip
    if started_again:  # a person started the role after the notification
        records.append({"kind": "fault", "fault": "operator_stop", "t": t - 5, "end": t + 1,
                        "chatroom": stuck["chatroom"], "role": stuck["role"],
                        "machine": "m1", "scope": "role"})  # fmt: skip
    return records


def test_invariant_7_counts_a_role_a_person_left_stopped_as_visible(log: list[Record]) -> None:
    """Tasks waiting on a role a person stopped (and Vigil said so) are stuck visibly;
    once the role is started again, a task still waiting is a violation again."""
    left = _stuck_behind_a_stopped_role(copy.deepcopy(log), started_again=False)
    assert not [v for v in checker.check(left) if v.invariant == 7]
    again = _stuck_behind_a_stopped_role(copy.deepcopy(log), started_again=True)
    assert [v for v in checker.check(again) if v.invariant == 7]


def _partition(records: list[Record], t: float, machine: str, roles: list[str]) -> Record:
    return {"kind": "fault", "t": t, "end": t + 2, "fault": "partition", "scope": "group",
            "machine": machine, "roles": roles, "target": "replica-0"}  # fmt: skip


def test_a_partition_excuses_its_group_and_nobody_else(log: list[Record]) -> None:
    """A death inside a partitioned group (its machine's agents, its own clients) is not
    false, nor is a late kill → offline there; a role outside the group is not excused."""
    remote = role_of_kind(log, "remote")
    t = later(log)
    # the same false death, inside a partition window of its machine: excused
    inside = false_death(copy.deepcopy(log))
    inside.append(_partition(inside, t + 1, remote["machine"], []))
    assert not [v for v in checker.check(inside) if v.invariant == 5]
    # a late kill → offline of an agent of the partitioned machine: excused
    late = slow_kill_detection(copy.deepcopy(log))
    late.append(_partition(late, t, remote["machine"], []))
    assert not [v for v in checker.check(late) if v.invariant == 5]
    # a partition of another machine excuses nothing of this one
    other = false_death(copy.deepcopy(log))
    other.append(_partition(other, t + 1, "elsewhere", ["chaos/someone-else"]))
    assert [v for v in checker.check(other) if v.invariant == 5]
    # a custom role excused by name, as one of the group's own clients
    custom = role_of_kind(log, "custom")["role"]
    named = copy.deepcopy(log)
    named += [
        {"kind": "presence", "t": t, "revision": 10**9, "type": "joined", "chatroom": "chaos",
         "role": custom, "epoch": 999, "status": "live", "reason": "", "principal": "p"},
        {"kind": "presence", "t": t + 2, "revision": 10**9 + 1, "type": "offline",
         "chatroom": "chaos", "role": custom, "epoch": 999, "status": "offline",
         "reason": "stream_dropped", "principal": "p"},
    ]  # fmt: skip
    extend_run(named, t + 3)
    assert [v for v in checker.check(named) if v.invariant == 5]
    named.append(_partition(named, t + 1, "elsewhere", [f"chaos/{custom}"]))
    assert not [v for v in checker.check(named) if v.invariant == 5]


def test_the_live_check_runs_the_invariants_whose_inputs_arrive_during_the_run(
    log: list[Record],
) -> None:
    assert {fn.__name__ for fn in checker.LIVE_CHECKS} == {
        "inv1_one_open_start",
        "inv5_no_false_death",
    }
    assert {v.invariant for v in checker.check(false_death(copy.deepcopy(log)), live=True)} == {5}
    # an input collected only at the end (the exits) is not judged live
    assert checker.check(exit_recorded_twice(copy.deepcopy(log)), live=True) == []
