"""The independent checker of the chaos soak.

It reads an event log — JSON records gathered from Vigil's public surfaces (the audit
log through `TaskHistory`, the `List*` RPCs, the presence stream) and the runner's own
fault and client logs — and checks the guarantees Vigil states (README, "Guarantees").
It imports nothing from Vigil: its FSM table and vocabularies are its own transcription
of the documented contract, so a bug in Vigil's code cannot hide in the checker.

Every check is one function `invN_name(log) -> list[Violation]`; `check(records)` runs
them all. A `Violation` names its invariant and carries the first events that break it.

Record kinds (every time is Unix seconds, float; `t` is when it happened or was read):

  run             {seed, start, end, ttl_s, grace_s, kill_offline_ms, pending_idle_s}
  clock           {proc_start_offset}: what to add to a process start time computed from
                  /proc (boot time `btime` is whole seconds) to get the wall clock
  role            {chatroom, role, role_kind: remote|custom, machine}
  send            {task, chatroom, role, status, attempt}             (runner, SendMessage reply)
  transition      {task, chatroom, role, from, to, trigger, actor, attempt, reason, seq}
  task            {task, chatroom, role, status, attempt, needs_attention}   (final listing)
  task_sample     {t0, t1, tasks: [{task, status}]}
  presence        {revision, type, chatroom, role, epoch, status, reason, principal}
  agents_sample   {t0, t1, agents: [{chatroom, role, machine, pid, status, desired}]}
  commands_sample {t0, t1, commands: [{id, type, chatroom, role, status}]}
  command         {id, type, chatroom, role, machine, status, deadline, requested_by}
  exit            {machine, chatroom, role, pid, started_at, exited_at, classification}
                  (t: recorded_at)
  notification    {id, type, chatroom, role, task}
  proc_sample     {procs: [{machine, pid, started_at}]}   (agent processes alive per /proc)
  client_op       {op: start|complete|release, task, attempt, accepted, principal}
  fault           {fault, end, chatroom, role, machine, pid, roles,
                   scope: role|machine|group|global}: a `group` is cut off from the
                   network (a partition): its `machine` and the `roles` ("chatroom/role")
                   of clients of its own in the same network namespace
"""

from __future__ import annotations

import bisect
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Record = dict[str, Any]

# -- the contract, transcribed (docs/architecture.md, "Tasks: one FSM") ----------------

PENDING, ACKNOWLEDGED, IN_PROGRESS = "pending", "acknowledged", "in_progress"
COMPLETED, QUEUED, CLOSED = "completed", "queued", "closed"
INITIAL = frozenset({PENDING, QUEUED})
TERMINAL = frozenset({COMPLETED, CLOSED})
BUSY = frozenset({ACKNOWLEDGED, IN_PROGRESS})

# (from, to, trigger) -> does it start a new attempt
FSM: dict[tuple[str, str, str], bool] = {
    (PENDING, ACKNOWLEDGED, "claimTask"): False,
    (ACKNOWLEDGED, IN_PROGRESS, "startTask"): False,
    (IN_PROGRESS, COMPLETED, "completeTask"): False,
    (ACKNOWLEDGED, COMPLETED, "completeTask"): False,
    (PENDING, CLOSED, "cancelTask"): False,
    (QUEUED, CLOSED, "cancelTask"): False,
    (ACKNOWLEDGED, CLOSED, "cancelTask"): False,
    (IN_PROGRESS, CLOSED, "cancelTask"): False,
    (QUEUED, PENDING, "promoteNextTask"): False,
    (ACKNOWLEDGED, PENDING, "recoverStuckAcknowledged"): True,
    (IN_PROGRESS, PENDING, "recoverOrphaned"): True,
    (ACKNOWLEDGED, PENDING, "releaseTask"): True,
    (IN_PROGRESS, PENDING, "releaseTask"): True,
}

OPEN_COMMAND = frozenset({"pending", "delivered"})
# Offline reasons the server decides on its own (a participant's own leave is not a death).
SERVER_OFFLINE = frozenset({"stream_dropped", "ttl_expired"})
ADMIN_PREFIX = "admin:"

# Clock slack between a read and the database timestamps it is compared with (one host).
EPS_S = 0.05
# A sampled status may lag the audit row's timestamp by the writing transaction's length.
SAMPLE_SLACK_S = 1.0
COMMIT_SLACK_S = 0.5  # a recording transaction's time stamp -> its commit

INVARIANTS = {
    1: "one_open_start",
    2: "audit_is_the_status_history",
    3: "no_stale_or_foreign_acceptance",
    4: "no_pending_while_idle_live",
    5: "no_false_death",
    6: "exits_recorded_once",
    7: "every_task_resolved",
    8: "stopped_stays_stopped",
}


@dataclass
class Violation:
    invariant: int
    message: str
    events: list[Record] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.invariant}:{INVARIANTS[self.invariant]}"

    def to_json(self) -> dict[str, Any]:
        return {"invariant": self.name, "message": self.message, "events": self.events[:5]}

    def __str__(self) -> str:
        events = "\n".join("    " + json.dumps(e, sort_keys=True) for e in self.events[:5])
        return f"invariant {self.name}: {self.message}\n{events}"


# -- the log -------------------------------------------------------------------------


@dataclass
class Window:
    start: float
    end: float
    fault: str
    scope: str  # global | group | machine | role
    chatroom: str = ""
    role: str = ""
    machine: str = ""
    roles: frozenset[str] = frozenset()  # a group's own clients, "chatroom/role"

    def covers(self, t: float, chatroom: str, role: str, machine: str, grace: float) -> bool:
        if not (self.start - EPS_S <= t <= self.end + grace):
            return False
        if self.scope == "global":
            return True
        if self.scope == "machine":
            return bool(machine) and machine == self.machine
        if self.scope == "group":
            return (bool(machine) and machine == self.machine) or f"{chatroom}/{role}" in self.roles
        return (chatroom, role) == (self.chatroom, self.role)


class Log:
    """The records, indexed for the checks."""

    def __init__(self, records: Iterable[Record]) -> None:
        self.records = list(records)
        self.by_kind: dict[str, list[Record]] = defaultdict(list)
        for r in self.records:
            self.by_kind[r["kind"]].append(r)
        run = self.by_kind["run"]
        self.run: Record = run[0] if run else {}
        self.grace = float(self.run.get("grace_s", 3.0))
        self.kill_offline_s = float(self.run.get("kill_offline_ms", 100)) / 1000
        self.pending_idle_s = float(self.run.get("pending_idle_s", 1.0))
        self.roles = {(r["chatroom"], r["role"]): r for r in self.by_kind["role"]}
        clock = self.by_kind["clock"]
        self.proc_offset = float(clock[0]["proc_start_offset"]) if clock else 0.0
        self.transitions: dict[str, list[Record]] = defaultdict(list)
        for r in sorted(self.by_kind["transition"], key=lambda r: (r["t"], r.get("seq", 0))):
            self.transitions[r["task"]].append(r)
        self.sends = {r["task"]: r for r in self.by_kind["send"]}
        self.final = {r["task"]: r for r in self.by_kind["task"]}
        self.windows = [
            Window(
                f["t"],
                float(f.get("end") or f["t"]),
                f["fault"],
                f.get("scope", "global"),
                f.get("chatroom", ""),
                f.get("role", ""),
                f.get("machine", ""),
                frozenset(f.get("roles") or ()),
            )
            for f in self.by_kind["fault"]
            if f.get("scope")
        ]
        self.presence = sorted(self.by_kind["presence"], key=lambda r: r["revision"])

    def kind(self, name: str) -> list[Record]:
        return self.by_kind.get(name, [])

    def machine_of(self, chatroom: str, role: str) -> str:
        return str(self.roles.get((chatroom, role), {}).get("machine", ""))

    def excused(self, t: float, chatroom: str, role: str, grace: float | None = None) -> bool:
        g = self.grace if grace is None else grace
        machine = self.machine_of(chatroom, role)
        return any(w.covers(t, chatroom, role, machine, g) for w in self.windows)


def read_log(path: Path) -> list[Record]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _interval_overlap(a0: float, a1: float, b0: float, b1: float) -> tuple[float, float] | None:
    lo, hi = max(a0, b0), min(a1, b1)
    return (lo, hi) if hi > lo else None


# -- 1 -------------------------------------------------------------------------------


def inv1_one_open_start(log: Log) -> list[Violation]:
    """At most one open (pending or delivered) start command per (chatroom, role) in
    every sample of the commands."""
    out = []
    for sample in log.kind("commands_sample"):
        open_starts: dict[tuple[str, str], list[Record]] = defaultdict(list)
        for c in sample["commands"]:
            if c["type"] == "start" and c["status"] in OPEN_COMMAND:
                open_starts[(c["chatroom"], c["role"])].append(c)
        for (chatroom, role), cmds in sorted(open_starts.items()):
            if len(cmds) > 1:
                out.append(
                    Violation(
                        1,
                        f"{len(cmds)} open start commands for {chatroom}/{role} "
                        f"(ids {[c['id'] for c in cmds]}) in the sample at {sample['t0']:.3f}",
                        [{**sample, "commands": cmds}],
                    )
                )
    return out


# -- 2 -------------------------------------------------------------------------------


def _status_at(rows: Sequence[Record], initial: str, t: float) -> str:
    status = initial
    for r in rows:
        if r["t"] > t:
            break
        status = r["to"]
    return status


def inv2_audit_is_the_status_history(log: Log) -> list[Violation]:
    """Every audit row is an FSM rule and follows from the row before it (so no status
    change has zero or two rows), the chain ends where the task stands, attempts move
    only as the rules say, and every status a listing showed is one the chain had then."""
    out = []
    tasks = set(log.transitions) | set(log.final) | set(log.sends)
    initial: dict[str, str] = {}
    for task in sorted(tasks):
        rows = log.transitions.get(task, [])
        send = log.sends.get(task)
        status = send["status"] if send else (rows[0]["from"] if rows else None)
        attempt = send.get("attempt") if send else None
        if status is not None and status not in INITIAL:
            out.append(Violation(2, f"task {task} created {status}", [send or rows[0]]))
            continue
        initial[task] = status or PENDING
        prev: Record | None = send
        for r in rows:
            key = (r["from"], r["to"], r["trigger"])
            if key not in FSM:
                out.append(Violation(2, f"task {task}: audit row {key} is no FSM rule", [r]))
                break
            if status is not None and r["from"] != status:
                out.append(
                    Violation(
                        2,
                        f"task {task}: audit row from {r['from']} but the task was {status} "
                        "(a status change without its row, or a row twice)",
                        [e for e in (prev, r) if e],
                    )
                )
                break
            if attempt is not None:
                want = attempt + 1 if FSM[key] else attempt
                if r["attempt"] != want:
                    out.append(
                        Violation(
                            2,
                            f"task {task}: {r['trigger']} moved the attempt {attempt} -> "
                            f"{r['attempt']} (the rules say {want})",
                            [e for e in (prev, r) if e],
                        )
                    )
                    break
            status, attempt, prev = r["to"], r["attempt"], r
        final = log.final.get(task)
        if final is not None and status is not None and final["status"] != status:
            out.append(
                Violation(
                    2,
                    f"task {task} stands {final['status']} but its audit chain ends {status}",
                    [e for e in (prev, final) if e],
                )
            )
    for sample in log.kind("task_sample"):
        for s in sample["tasks"]:
            task = s["task"]
            rows = log.transitions.get(task, [])
            if task not in initial:
                continue
            lo, hi = sample["t0"] - SAMPLE_SLACK_S, sample["t1"] + EPS_S
            seen = {_status_at(rows, initial[task], lo)}
            seen |= {r["to"] for r in rows if lo <= r["t"] <= hi}
            if s["status"] not in seen:
                out.append(
                    Violation(
                        2,
                        f"task {task} was listed {s['status']} at {sample['t0']:.3f}, a status "
                        f"its audit chain never had then ({sorted(seen)})",
                        [{"kind": "task_sample", "t0": sample["t0"], **s}, *rows[-3:]],
                    )
                )
                break
    return out


# -- 3 -------------------------------------------------------------------------------


def inv3_no_stale_or_foreign_acceptance(log: Log) -> list[Violation]:
    """A start or completion is accepted only from the attempt and the principal that
    claimed the task: in the audit log (start/complete rows carry the claim's attempt and
    its claimer, or an admin), and for every call the clients made (an accepted call
    presented the attempt the task then had)."""
    out = []
    for task, rows in sorted(log.transitions.items()):
        claim: Record | None = None
        for r in rows:
            if r["trigger"] == "claimTask":
                claim = r
            elif r["trigger"] in ("startTask", "completeTask"):
                if claim is None or claim["attempt"] != r["attempt"]:
                    out.append(
                        Violation(
                            3,
                            f"task {task}: {r['trigger']} on attempt {r['attempt']} with no "
                            "claim of that attempt",
                            [e for e in (claim, r) if e],
                        )
                    )
                elif r["actor"] != claim["actor"] and not r["actor"].startswith(ADMIN_PREFIX):
                    out.append(
                        Violation(
                            3,
                            f"task {task}: {r['trigger']} by {r['actor']}, claimed by "
                            f"{claim['actor']}",
                            [claim, r],
                        )
                    )
            elif r["trigger"] in ("recoverStuckAcknowledged", "recoverOrphaned", "releaseTask"):
                claim = None
    trig = {"start": "startTask", "complete": "completeTask", "release": "releaseTask"}
    for op in log.kind("client_op"):
        if not op["accepted"] or op["op"] not in trig:
            continue
        rows = log.transitions.get(op["task"], [])
        match = [r for r in rows if r["trigger"] == trig[op["op"]]]
        if op["op"] == "release":
            ok = any(r["attempt"] == op["attempt"] + 1 for r in match)
        else:
            ok = any(r["attempt"] == op["attempt"] for r in match)
        if not ok:
            out.append(
                Violation(
                    3,
                    f"task {op['task']}: {op['op']} presenting attempt {op['attempt']} was "
                    "accepted, but no audit row of that attempt exists (a stale attempt "
                    "accepted)",
                    [op, *match[-2:]],
                )
            )
    return out


# -- 4 -------------------------------------------------------------------------------


def _live_intervals(log: Log, end: float) -> dict[tuple[str, str], list[tuple[float, float]]]:
    live: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    since: dict[tuple[str, str], float] = {}
    for e in log.presence:
        key = (e["chatroom"], e["role"])
        if e["type"] in ("joined", "resumed"):
            since.setdefault(key, e["t"])
        elif e["type"] == "offline" and key in since:
            live[key].append((since.pop(key), e["t"]))
    for key, t in since.items():
        live[key].append((t, end))
    return live


def _status_intervals(
    log: Log, end: float
) -> dict[tuple[str, str], list[tuple[float, float, str, str]]]:
    """(chatroom, role) -> [(from, to, status, task)] for every task of the role."""
    out: dict[tuple[str, str], list[tuple[float, float, str, str]]] = defaultdict(list)
    for task, rows in log.transitions.items():
        send = log.sends.get(task)
        meta = send or rows[0]
        key = (meta["chatroom"], meta["role"])
        t, status = (send["t"], send["status"]) if send else (rows[0]["t"], rows[0]["from"])
        for r in rows:
            out[key].append((t, r["t"], status, task))
            t, status = r["t"], r["to"]
        out[key].append((t, end, status, task))
    for task, send in log.sends.items():
        if task not in log.transitions:
            key = (send["chatroom"], send["role"])
            out[key].append((send["t"], end, send["status"], task))
    return out


def inv4_no_pending_while_idle_live(log: Log) -> list[Violation]:
    """No task stays pending longer than `pending_idle_s` while a live participant of its
    role holds no task (idle, waiting), outside declared outage windows (and their grace)."""
    end = float(log.run.get("end") or max((r.get("t", 0) for r in log.records), default=0))
    live = _live_intervals(log, end)
    statuses = _status_intervals(log, end)
    out = []
    limit = log.pending_idle_s
    for key, intervals in sorted(statuses.items()):
        busy = sorted((a, b) for a, b, s, _ in intervals if s in BUSY)
        for a, b, status, task in intervals:
            if status != PENDING:
                continue
            for la, lb in live.get(key, []):
                ov = _interval_overlap(a, b, la, lb)
                if ov is None:
                    continue
                # Cut out the times the role held a task (not idle).
                free = [ov]
                for ba, bb in busy:
                    nxt = []
                    for fa, fb in free:
                        if bb <= fa or ba >= fb:
                            nxt.append((fa, fb))
                            continue
                        if ba > fa:
                            nxt.append((fa, ba))
                        if bb < fb:
                            nxt.append((bb, fb))
                    free = nxt
                for fa, fb in free:
                    if fb - fa <= limit:
                        continue
                    # Excused only if an outage window touches the whole stretch's start.
                    if log.excused(fa, *key) or log.excused(fa + limit, *key):
                        continue
                    out.append(
                        Violation(
                            4,
                            f"task {task} pending {fb - fa:.2f}s (from {fa:.3f}) while "
                            f"{key[0]}/{key[1]} had a live idle participant",
                            [
                                *[r for r in log.transitions.get(task, []) if r["t"] <= fb][-2:],
                                *[
                                    e
                                    for e in log.presence
                                    if (e["chatroom"], e["role"]) == key and la <= e["t"] <= fa
                                ][-2:],
                            ],
                        )
                    )
                    break
    return out


# -- 5 -------------------------------------------------------------------------------


def _live_epoch_at(log: Log, chatroom: str, role: str, t: float) -> Record | None:
    last = None
    for e in log.presence:
        if e["t"] > t:
            break
        if (e["chatroom"], e["role"]) == (chatroom, role):
            last = e
    return last if last is not None and last["type"] in ("joined", "resumed") else None


def kill_offline_latencies(log: Log) -> tuple[list[float], list[Violation]]:
    """For every SIGKILLed agent that was live (and not in a global outage): kill →
    offline in ms, and the kills that took longer than the limit."""
    lat, out = [], []
    for f in log.kind("fault"):
        if f["fault"] not in ("agent_kill", "waiter_kill"):
            continue
        chatroom, role, t = f["chatroom"], f["role"], f["t"]
        # In an outage, or cut off from the network, a death is noticed late (keepalive).
        machine = log.machine_of(chatroom, role)
        if any(
            w.scope in ("global", "group") and w.covers(t, chatroom, role, machine, log.grace)
            for w in log.windows
        ):
            continue
        if f.get("paused"):
            continue
        joined = _live_epoch_at(log, chatroom, role, t)
        if joined is None or (f.get("principal") and joined.get("principal") != f["principal"]):
            continue
        off = next(
            (
                e
                for e in log.presence
                if e["t"] >= joined["t"]
                and (e["chatroom"], e["role"], e["epoch"]) == (chatroom, role, joined["epoch"])
                and e["type"] == "offline"
            ),
            None,
        )
        if off is None:
            out.append(
                Violation(5, f"{chatroom}/{role} SIGKILLed and never marked offline", [f, joined])
            )
            continue
        ms = max(0.0, (off["t"] - t) * 1000)
        lat.append(ms)
        if ms > log.kill_offline_s * 1000:
            out.append(
                Violation(
                    5,
                    f"{chatroom}/{role} SIGKILLed, offline only after {ms:.1f} ms "
                    f"(limit {log.kill_offline_s * 1000:.0f} ms)",
                    [f, joined, off],
                )
            )
    return lat, out


def inv5_no_false_death(log: Log) -> list[Violation]:
    """The server marks a participant offline on its own (stream dropped, TTL expired)
    only when its process was killed, stopped or cut off (a fault window of its role, its
    machine or the whole system, with grace); every SIGKILLed live agent is offline within
    the limit (`kill_offline_ms`)."""
    out = []
    for e in log.presence:
        if e["type"] != "offline" or e.get("reason") not in SERVER_OFFLINE:
            continue
        if e["chatroom"] == "vigil.machines":
            # A daemon's presence: its machine's daemon faults excuse it.
            machine = e["role"]
            if any(
                w.covers(e["t"], "", "", machine, log.grace)
                for w in log.windows
                if w.scope in ("machine", "group", "global")
            ):
                continue
        elif log.excused(e["t"], e["chatroom"], e["role"]):
            continue
        out.append(
            Violation(
                5,
                f"{e['chatroom']}/{e['role']} epoch {e['epoch']} marked offline "
                f"({e.get('reason')}) at {e['t']:.3f} while no fault touched it",
                [e],
            )
        )
    out += kill_offline_latencies(log)[1]
    return out


# -- 6 -------------------------------------------------------------------------------


def inv6_exits_recorded_once(log: Log) -> list[Violation]:
    """Every agent exit is recorded once (per pid and start time); every pid shown
    running ends with a recorded exit or is still shown running at the end; a pid is
    never shown running after its exit was recorded, nor shown gone before its exit was
    recorded, nor recorded gone while /proc showed it alive."""
    out = []
    exits = log.kind("exit")
    seen: dict[tuple[str, int, float], Record] = {}
    recorded: dict[tuple[str, int], list[Record]] = defaultdict(list)
    for x in sorted(exits, key=lambda x: x["t"]):
        incarnation = (x["machine"], int(x["pid"]), round(float(x["started_at"]), 2))
        if incarnation in seen:
            out.append(
                Violation(6, f"exit of pid {x['pid']} recorded twice", [seen[incarnation], x])
            )
        seen[incarnation] = x
        recorded[(x["machine"], int(x["pid"]))].append(x)
    samples = sorted(log.kind("agents_sample"), key=lambda s: s["t0"])
    shown: dict[tuple[str, str], Record] = {}
    ever: dict[tuple[str, int], tuple[Record, Record]] = {}
    for s in samples:
        for a in s["agents"]:
            key = (a["chatroom"], a["role"])
            running = a["status"] == "running" and a["pid"]
            if running:
                mp = (a["machine"], int(a["pid"]))
                ever.setdefault(mp, (s, a))
                # An exit's `recorded_at` is stamped as its transaction begins; the
                # listing shows it from the commit on (COMMIT_SLACK_S later at most).
                gone = [x for x in recorded.get(mp, []) if x["t"] < s["t0"] - COMMIT_SLACK_S]
                if gone:
                    out.append(
                        Violation(
                            6,
                            f"pid {a['pid']} of {key[0]}/{key[1]} shown running at "
                            f"{s['t0']:.3f}, after its exit was recorded",
                            [gone[0], {"kind": "agents_sample", "t0": s["t0"], **a}],
                        )
                    )
            before = shown.get(key)
            if before is not None and (not running or int(a["pid"]) != int(before["pid"])):
                mp = (before["machine"], int(before["pid"]))
                if not any(x["t"] <= s["t1"] + EPS_S for x in recorded.get(mp, [])):
                    out.append(
                        Violation(
                            6,
                            f"pid {before['pid']} of {key[0]}/{key[1]} no longer shown running "
                            f"at {s['t0']:.3f} with no exit recorded",
                            [before, {"kind": "agents_sample", "t0": s["t0"], **a}],
                        )
                    )
            if running:
                shown[key] = {"kind": "agents_sample", "t0": s["t0"], **a}
            else:
                shown.pop(key, None)
    last = samples[-1] if samples else None
    still = (
        {(a["machine"], int(a["pid"])) for a in last["agents"] if a["status"] == "running"}
        if last
        else set()
    )
    for mp, (s, a) in sorted(ever.items()):
        if mp not in recorded and mp not in still:
            out.append(
                Violation(
                    6,
                    f"pid {mp[1]} on {mp[0]} was shown running and its exit was never recorded",
                    [{"kind": "agents_sample", "t0": s["t0"], **a}],
                )
            )
    for p in log.kind("proc_sample"):
        for proc in p["procs"]:
            for x in recorded.get((proc["machine"], int(proc["pid"])), []):
                if abs(float(x["started_at"]) - float(proc["started_at"])) > 1.0:
                    continue  # another incarnation of the pid
                if x["t"] < p["t"] - EPS_S:
                    out.append(
                        Violation(
                            6,
                            f"pid {proc['pid']} recorded gone ({x['classification']}) at "
                            f"{x['t']:.3f} while /proc showed it alive at {p['t']:.3f}",
                            [x, {"kind": "proc_sample", "t": p["t"], **proc}],
                        )
                    )
    return out


# -- 7 -------------------------------------------------------------------------------


def inv7_every_task_resolved(log: Log) -> list[Violation]:
    """Every sent task ends completed or closed, or is stuck visibly: a notification
    names it, or names what holds its role (the role's unfinished task, or the role
    stopped by a person). None lost, none stuck unseen, and none made that nobody sent
    (a send repeated after its answer was lost must not create a second task)."""
    out = []
    notified = {n.get("task") for n in log.kind("notification") if n.get("task")}
    restarted: dict[tuple[Any, Any], float] = {}  # role -> when a person last started it
    for f in log.kind("fault"):
        if f["fault"] == "operator_stop":
            key = (f.get("chatroom"), f.get("role"))
            restarted[key] = max(restarted.get(key, 0.0), f.get("end") or 0.0)
    stopped_roles = {  # still stopped: told so after the last time a person started it
        (n.get("chatroom"), n.get("role"))
        for n in log.kind("notification")
        if n.get("type") == "role_stopped"
        and n["t"] > restarted.get((n.get("chatroom"), n.get("role")), 0.0)
    }
    held_roles = {
        (f.get("chatroom"), f.get("role"))
        for t, f in log.final.items()
        if t in notified and f["status"] not in TERMINAL and f["status"] != "queued"
    }
    for task, send in sorted(log.sends.items()):
        final = log.final.get(task)
        if final is None:
            out.append(Violation(7, f"task {task} was sent and is not listed any more", [send]))
        elif final["status"] in TERMINAL:
            continue
        elif task in notified:
            continue
        elif final["status"] in ("queued", "pending") and (
            (final.get("chatroom"), final.get("role")) in stopped_roles | held_roles
        ):
            continue
        else:
            out.append(
                Violation(
                    7,
                    f"task {task} ended the run {final['status']}"
                    + (
                        " needing attention without a notification"
                        if final.get("needs_attention")
                        else ""
                    ),
                    [send, final, *log.transitions.get(task, [])[-2:]],
                )
            )
    for task, final in sorted(log.final.items()):
        if task not in log.sends:
            out.append(
                Violation(
                    7,
                    f"task {task} exists but was never sent (a send repeated after a lost "
                    "answer made it twice?)",
                    [final, *log.transitions.get(task, [])[:2]],
                )
            )
    return out


# -- 8 -------------------------------------------------------------------------------


def inv8_stopped_stays_stopped(log: Log) -> list[Violation]:
    """No start command for a role a person stopped (until they start it again), none at
    all for a custom role, and no start executed after its deadline (the process a start
    made began after the deadline)."""
    out = []
    stops = [f for f in log.kind("fault") if f["fault"] == "operator_stop"]
    commands = sorted(log.kind("command"), key=lambda c: c["t"])
    for c in commands:
        role = log.roles.get((c["chatroom"], c["role"]))
        if role is not None and role["role_kind"] == "custom":
            out.append(Violation(8, f"command {c['id']} ({c['type']}) for a custom role", [c]))
            continue
        if c["type"] != "start":
            continue
        for s in stops:
            if (s["chatroom"], s["role"]) != (c["chatroom"], c["role"]):
                continue
            if s["t"] + EPS_S < c["t"] < float(s["end"]) - EPS_S:
                out.append(
                    Violation(
                        8,
                        f"start command {c['id']} for {c['chatroom']}/{c['role']} while a "
                        "person had it stopped",
                        [s, c],
                    )
                )
    starts: dict[tuple[str, str, str], list[Record]] = defaultdict(list)
    for c in commands:
        if c["type"] == "start":
            starts[(c["chatroom"], c["role"], c["machine"])].append(c)
    procs: dict[tuple[str, int], Record] = {}
    for x in log.kind("exit"):
        procs[(x["machine"], int(x["pid"]))] = x
    for (_machine, _pid), x in sorted(procs.items()):
        started = float(x["started_at"]) + log.proc_offset  # on the wall clock
        cands = starts.get((x["chatroom"], x["role"], x["machine"]), [])
        times = [c["t"] for c in cands]
        i = bisect.bisect_right(times, started + EPS_S) - 1
        if i < 0:
            continue
        c = cands[i]
        if c["status"] == "done" and started > float(c["deadline"]) + EPS_S:
            out.append(
                Violation(
                    8,
                    f"start command {c['id']} ran after its deadline "
                    f"({started - float(c['deadline']):.3f}s late)",
                    [c, x],
                )
            )
        for s in stops:
            if (s["chatroom"], s["role"]) == (x["chatroom"], x["role"]) and (
                s["t"] + 0.5 < started < float(s["end"]) - EPS_S
            ):
                out.append(
                    Violation(
                        8,
                        f"pid {x['pid']} of {x['chatroom']}/{x['role']} started while a "
                        "person had the role stopped",
                        [s, x],
                    )
                )
    return out


CHECKS: list[Callable[[Log], list[Violation]]] = [
    inv1_one_open_start,
    inv2_audit_is_the_status_history,
    inv3_no_stale_or_foreign_acceptance,
    inv4_no_pending_while_idle_live,
    inv5_no_false_death,
    inv6_exits_recorded_once,
    inv7_every_task_resolved,
    inv8_stopped_stays_stopped,
]


# The checks whose every input is gathered while the run goes on (command samples, the
# presence stream, the fault log): run during the soak on what is in so far. The others
# read the audit log and the exits, collected at the end.
LIVE_CHECKS: list[Callable[[Log], list[Violation]]] = [inv1_one_open_start, inv5_no_false_death]


def check(records: Iterable[Record], *, final: bool = True, live: bool = False) -> list[Violation]:
    """Every violation in the log (invariant 7 only when the run is over: `final`; only
    the `LIVE_CHECKS` with `live`)."""
    log = Log(records)
    out: list[Violation] = []
    for fn in LIVE_CHECKS if live else CHECKS:
        if fn is inv7_every_task_resolved and not final:
            continue
        out += fn(log)
    return out


def percentiles(values: Sequence[float]) -> dict[str, float | int | None]:
    v = sorted(values)

    def q(p: float) -> float | None:
        if not v:
            return None
        return round(v[min(len(v) - 1, round(p * (len(v) - 1)))], 2)

    return {"n": len(v), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": q(1.0)}


def figures(records: Iterable[Record]) -> dict[str, Any]:
    """The numbers a soak reports: faults by kind, tasks, latencies."""
    log = Log(records)
    faults = Counter(f["fault"] for f in log.kind("fault"))
    finals = Counter(
        "needs_attention" if t.get("needs_attention") else t["status"] for t in log.final.values()
    )
    kill_lat, _ = kill_offline_latencies(log)
    exit_lat = [
        (x["t"] - float(x["exited_at"])) * 1000
        for x in log.kind("exit")
        if x.get("classification") not in ("daemon_lost",) and x.get("exited_at")
    ]
    return {
        "faults": dict(sorted(faults.items())),
        "tasks_sent": len(log.sends),
        "tasks_final": dict(sorted(finals.items())),
        "transitions": len(log.kind("transition")),
        "presence_events": len(log.presence),
        "exits_recorded": len(log.kind("exit")),
        "exits_by_classification": dict(
            sorted(Counter(x["classification"] for x in log.kind("exit")).items())
        ),
        "commands": dict(sorted(Counter(c["status"] for c in log.kind("command")).items())),
        "kill_to_offline_ms": percentiles(kill_lat),
        "exit_to_recorded_ms": percentiles(exit_lat),
    }


def summary_lines(violations: Sequence[Violation]) -> list[str]:
    by: Mapping[str, int] = Counter(v.name for v in violations)
    return [f"{name}: {n}" for name, n in sorted(by.items())]
