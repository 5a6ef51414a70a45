"""The live terminal view of `vigil up`: participants, agents with their status and
last exit, tasks by status and recent notifications, redrawn every second."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from vigil.core.db import Database
from vigil.core.errors import StorageError

REFRESH_S = 1.0
CLEAR = "\x1b[H\x1b[2J"


@dataclass
class Snapshot:
    participants: list[Any] = field(default_factory=list)
    agents: list[Any] = field(default_factory=list)
    tasks: dict[str, int] = field(default_factory=dict)
    notifications: list[Any] = field(default_factory=list)


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
                f"{p['chatroom']}/{p['role']}",
                p["kind"],
                p["status"],
                str(p["epoch"]),
                p["offline_reason"] or "-",
                _age(p["offline_at"] or p["joined_at"], now),
            ]
            for p in snap.participants
        ],
        ["ROLE", "KIND", "STATUS", "EPOCH", "REASON", "SINCE"],
    )
    lines += ["", "AGENTS"]
    lines += _table(
        [
            [
                f"{a['chatroom']}/{a['role']}",
                a["machine_id"],
                a["desired_state"],
                a["status"],
                str(a["pid"] or "-"),
                str(a["restart_count"]),
                _last_exit(a),
                _age(a["last_exit_at"], now),
            ]
            for a in snap.agents
        ],
        ["ROLE", "MACHINE", "DESIRED", "STATUS", "PID", "RESTARTS", "LAST EXIT", "WHEN"],
    )
    counts = "  ".join(f"{k} {v}" for k, v in sorted(snap.tasks.items())) or "(none)"
    lines += ["", "TASKS", f"  {counts}", "", "NOTIFICATIONS"]
    lines += [
        f"  {n['created_at'].strftime('%H:%M:%S')} [{n['kind']}] {n['message'][:100]}"
        for n in snap.notifications
    ] or ["  (none)"]
    return "\n".join(lines) + "\n"


def _last_exit(a: Any) -> str:
    if a["last_exit_classification"] is None:
        return "-"
    if a["last_exit_signal"]:
        return f"signal {a['last_exit_signal']} ({a['last_exit_classification']})"
    return f"code {a['last_exit_code']} ({a['last_exit_classification']})"


async def snapshot(db: Database) -> Snapshot:
    return Snapshot(
        participants=await db.fetch(
            "SELECT * FROM liveness.participants WHERE chatroom <> 'vigil.machines' "
            "ORDER BY status DESC, coalesce(offline_at, joined_at) DESC LIMIT 15"
        ),
        agents=await db.fetch("SELECT * FROM tasks.agents ORDER BY chatroom, role LIMIT 15"),
        tasks={
            r["status"]: r["n"]
            for r in await db.fetch("SELECT status, count(*) AS n FROM tasks.tasks GROUP BY status")
        },
        notifications=await db.fetch("SELECT * FROM tasks.notifications ORDER BY id DESC LIMIT 5"),
    )


async def run(db: Database, header: str, out: TextIO = sys.stdout) -> None:
    while True:
        try:
            text = render(await snapshot(db), header)
        except StorageError as exc:
            text = f"{header}\n  (database unavailable: {exc})\n"
        out.write(CLEAR + text)
        out.flush()
        await asyncio.sleep(REFRESH_S)
