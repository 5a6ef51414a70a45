"""The live terminal view of `vigil up`: participants, agents with their status and
last exit, tasks by status and recent notifications, redrawn every second. It reads
through the public API, like any other client."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO

from google.protobuf.message import Message

from vigil.cli.machine_cmds import last_exit_text
from vigil.cli.task_cmds import name_of
from vigil.client import Client, ClientConfig, RPCError
from vigil.core.timefmt import from_proto
from vigil.core.vocab import (
    MACHINES_CHATROOM,
    AgentKind,
    AgentStatus,
    DesiredState,
    NotificationKind,
    OfflineReason,
    ParticipantStatus,
    TaskStatus,
)
from vigil.v1 import liveness_pb2 as lpb
from vigil.v1 import machines_pb2 as mpb
from vigil.v1 import tasks_pb2 as tpb

REFRESH_S = 1.0
CLEAR = "\x1b[H\x1b[2J"
ROWS = 15


@dataclass
class Snapshot:
    participants: list[lpb.Participant] = field(default_factory=list)
    agents: list[mpb.Agent] = field(default_factory=list)
    tasks: dict[TaskStatus, int] = field(default_factory=dict)
    notifications: list[tpb.Notification] = field(default_factory=list)


def _when(msg: Message, name: str) -> datetime | None:
    return from_proto(getattr(msg, name)) if msg.HasField(name) else None


def _age(ts: datetime | None, now: datetime) -> str:
    if ts is None:
        return "-"
    s = (now - ts).total_seconds()
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago"


def _table(rows: list[list[str]], head: list[str]) -> list[str]:
    if not rows:
        return ["  (none)"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    out = ["  " + "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return [line.rstrip() for line in out]


def render(snap: Snapshot, header: str, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    lines = [header, f"  {now.strftime('%H:%M:%S')} UTC  (Ctrl-C stops Vigil)", ""]
    lines.append("PARTICIPANTS")
    lines += _table(
        [
            [
                f"{p.chatroom}/{p.role}",
                name_of(AgentKind, p.kind),
                name_of(ParticipantStatus, p.status),
                str(p.epoch),
                name_of(OfflineReason, p.offline_reason) if p.offline_reason else "-",
                _age(_when(p, "offline_at") or _when(p, "joined_at"), now),
            ]
            for p in snap.participants
        ],
        ["ROLE", "KIND", "STATUS", "EPOCH", "REASON", "SINCE"],
    )
    lines += ["", "AGENTS"]
    lines += _table(
        [
            [
                f"{a.chatroom}/{a.role}",
                a.machine_id,
                name_of(DesiredState, a.desired_state),
                name_of(AgentStatus, a.status),
                str(a.pid or "-"),
                str(a.restart_count),
                last_exit_text(a) if a.has_last_exit else "-",
                _age(_when(a, "last_exit_at"), now),
            ]
            for a in snap.agents
        ],
        ["ROLE", "MACHINE", "DESIRED", "STATUS", "PID", "RESTARTS", "LAST EXIT", "WHEN"],
    )
    counts = "  ".join(f"{k} {v}" for k, v in sorted(snap.tasks.items()) if v) or "(none)"
    lines += ["", "TASKS", f"  {counts}", "", "NOTIFICATIONS"]
    lines += [
        f"  {(_when(n, 'created_at') or now).strftime('%H:%M:%S')} "
        f"[{name_of(NotificationKind, n.kind)}] {n.message[:100]}"
        for n in snap.notifications
    ] or ["  (none)"]
    return "\n".join(lines) + "\n"


async def snapshot(client: Client) -> Snapshot:
    listed = await client.list_participants()
    people = [p for p in listed.participants if p.chatroom != MACHINES_CHATROOM]
    # Live first, then the most recent changes.
    people.sort(
        key=lambda p: (
            p.status != ParticipantStatus.LIVE.to_pb(),
            -(p.offline_at.seconds or p.joined_at.seconds),
        )
    )
    return Snapshot(
        participants=people[:ROWS],
        agents=(await client.list_agents())[:ROWS],
        tasks=await client.count_tasks(),
        notifications=await client.list_notifications(limit=5, newest_first=True),
    )


async def run(config: ClientConfig, header: str, out: TextIO = sys.stdout) -> None:
    async with Client(config) as client:
        while True:
            try:
                text = render(await snapshot(client), header)
            except RPCError as exc:
                text = f"{header}\n  (Vigil unavailable: {exc})\n"
            out.write(CLEAR + text)
            out.flush()
            await asyncio.sleep(REFRESH_S)
