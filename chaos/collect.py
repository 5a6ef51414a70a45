"""The collector: turns what Vigil shows on its public surfaces into the checker's
records (chaos/checker.py documents them). It uses only the public RPCs, as any client
with a read-only token could: `TaskHistory` (the audit log), `ListTasks`, `ListAgents`,
`ListCommands`, `ListExits`, `ListNotifications`, `ListChatrooms` and the
`WatchParticipants` presence stream; and /proc for the agent processes that are alive."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from vigil.client import Client, RPCError
from vigil.core.vocab import (
    AgentKind,
    AgentStatus,
    CommandStatus,
    CommandType,
    DesiredState,
    ExitClassification,
    NotificationKind,
    OfflineReason,
    ParticipantStatus,
    PresenceEventType,
    TaskStatus,
)
from vigil.v1 import liveness_pb2 as lpb
from vigil.v1 import machines_pb2 as mpb
from vigil.v1 import tasks_pb2 as tpb

Record = dict[str, Any]
OPEN_TASK_STATUSES = (
    TaskStatus.PENDING,
    TaskStatus.ACKNOWLEDGED,
    TaskStatus.IN_PROGRESS,
    TaskStatus.QUEUED,
)


def ts(t: Timestamp) -> float | None:
    if t.seconds == 0 and t.nanos == 0:
        return None
    return t.seconds + t.nanos / 1e9


class EventLog:
    """Records appended as JSON lines to a file (and kept in memory for the checks)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[Record] = []
        self._f = path.open("a")

    def add(self, kind: str, t: float | None = None, **fields: Any) -> Record:
        record = {"kind": kind, "t": time.time() if t is None else t, **fields}
        self.records.append(record)
        self._f.write(json.dumps(record, sort_keys=True) + "\n")
        self._f.flush()
        return record

    def close(self) -> None:
        self._f.close()


def presence_record(e: lpb.PresenceEvent) -> Record:
    p = e.participant
    return {
        "t": ts(e.at) or time.time(),
        "revision": e.revision,
        "type": PresenceEventType.from_pb(e.type).value,
        "chatroom": p.chatroom,
        "role": p.role,
        "epoch": p.epoch,
        "status": ParticipantStatus.from_pb(p.status).value,
        "reason": (
            OfflineReason.from_pb(p.offline_reason).value
            if p.offline_reason != lpb.OFFLINE_REASON_UNSPECIFIED
            else ""
        ),
        "principal": p.principal,
        "connection_id": p.connection_id,
    }


async def watch_presence(client: Client, log: EventLog, stop: asyncio.Event) -> None:
    """Follow the presence stream from the start, resuming after the last revision seen
    whenever the stream breaks (replica killed, database down): no event is missed."""
    revision = 0
    while not stop.is_set():
        try:
            async for e in client.watch_participants(revision):
                if e.revision <= revision:
                    continue
                revision = e.revision
                rec = presence_record(e)
                log.add("presence", **rec)
                if stop.is_set():
                    return
        except RPCError:
            pass
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


def agent_record(a: mpb.Agent) -> Record:
    return {
        "chatroom": a.chatroom,
        "role": a.role,
        "machine": a.machine_id,
        "pid": a.pid,
        "status": AgentStatus.from_pb(a.status).value,
        "desired": DesiredState.from_pb(a.desired_state).value
        if a.desired_state
        else "unspecified",
        "restarts": a.restart_count,
    }


def command_record(c: mpb.Command) -> Record:
    return {
        "t": ts(c.created_at),
        "id": c.id,
        "type": CommandType.from_pb(c.type).value,
        "chatroom": c.chatroom,
        "role": c.role,
        "machine": c.machine_id,
        "status": CommandStatus.from_pb(c.status).value,
        "deadline": ts(c.deadline_at),
        "requested_by": c.requested_by,
        "reason": c.reason,
        "outcome": c.outcome_message,
    }


def exit_record(x: mpb.AgentExit) -> Record:
    return {
        "t": ts(x.recorded_at),
        "machine": x.machine_id,
        "chatroom": x.child.chatroom,
        "role": x.child.role,
        "pid": x.child.pid,
        "started_at": ts(x.child.started_at),
        "exited_at": ts(x.exited_at),
        "classification": ExitClassification.from_pb(x.classification).value,
        "exit_code": x.exit_code if x.has_exit_code else None,
        "signal": x.signal,
    }


def task_record(t: tpb.Task) -> Record:
    return {
        "task": t.id,
        "chatroom": t.chatroom,
        "role": t.role,
        "status": TaskStatus.from_pb(t.status).value,
        "attempt": t.attempt,
        "needs_attention": t.needs_attention,
        "recoveries": t.recoveries,
    }


def transition_records(task: tpb.Task, rows: list[tpb.Transition]) -> list[Record]:
    return [
        {
            "t": ts(r.at),
            "seq": i,
            "task": task.id,
            "chatroom": task.chatroom,
            "role": task.role,
            "from": TaskStatus.from_pb(r.from_status).value,
            "to": TaskStatus.from_pb(r.to_status).value,
            "trigger": r.trigger,
            "actor": r.actor,
            "attempt": r.attempt,
            "reason": r.reason,
        }
        for i, r in enumerate(rows)
    ]


# -- samples ------------------------------------------------------------------------


def proc_alive(pid: int) -> float | None:
    """The start time (as the daemon computes it) of a live, non-zombie process."""
    from vigil.daemon.proc import start_time

    started = start_time(pid)
    return started.timestamp() if started is not None else None


async def sample(client: Client, log: EventLog) -> list[Record]:
    """One sample of the agents, the open commands, the open tasks, and /proc for the
    agent processes shown; the agents as listed."""
    t0 = time.time()
    agents = [agent_record(a) for a in await client.list_agents()]
    t1 = time.time()
    log.add("agents_sample", t0, t0=t0, t1=t1, agents=agents)
    procs = []
    for a in agents:
        if a["pid"]:
            started = proc_alive(int(a["pid"]))
            if started is not None:
                procs.append({"machine": a["machine"], "pid": a["pid"], "started_at": started})
    log.add("proc_sample", procs=procs)
    t0 = time.time()
    cmds = [command_record(c) for c in await client.list_commands(limit=200)]
    t1 = time.time()
    open_cmds = [c for c in cmds if c["status"] in ("pending", "delivered")]
    log.add("commands_sample", t0, t0=t0, t1=t1, commands=open_cmds)
    t0 = time.time()
    tasks: list[Record] = []
    for status in OPEN_TASK_STATUSES:
        tasks += [
            {"task": t.id, "status": TaskStatus.from_pb(t.status).value}
            for t in await client.list_tasks(status=status)
        ]
    t1 = time.time()
    log.add("task_sample", t0, t0=t0, t1=t1, tasks=tasks)
    return agents


async def sampler(
    client: Client, log: EventLog, stop: asyncio.Event, interval: float = 0.5
) -> None:
    while not stop.is_set():
        with contextlib.suppress(RPCError):
            await sample(client, log)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


# -- the end --------------------------------------------------------------------------


async def collect_final(
    client: Client, log: EventLog, progress: Callable[[str], None] = print
) -> None:
    """Everything the checks need at the end: roles, tasks and their audit rows,
    commands, exits, notifications."""
    for room in await client.list_chatrooms():
        for r in room.roles:
            log.add(
                "role",
                chatroom=room.name,
                role=r.role,
                role_kind=AgentKind.from_pb(r.kind).value,
                machine=r.machine,
            )
    tasks = await client.list_tasks()
    progress(f"collecting the audit log of {len(tasks)} tasks")
    sem = asyncio.Semaphore(8)

    async def one(t: tpb.Task) -> list[Record]:
        async with sem:
            return transition_records(t, await client.task_history(t.id))

    for t, rows in zip(tasks, await asyncio.gather(*(one(t) for t in tasks)), strict=True):
        for rec in rows:
            log.add("transition", **rec)
        log.add("task", **task_record(t))
    for c in await client.list_commands():
        log.add("command", **command_record(c))
    for x in await client.list_exits():
        log.add("exit", **exit_record(x))
    for n in await client.list_notifications():
        log.add(
            "notification",
            ts(n.created_at),
            id=n.id,
            type=NotificationKind.from_pb(n.kind).value,
            chatroom=n.chatroom,
            role=n.role,
            task=n.task_id,
        )


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
