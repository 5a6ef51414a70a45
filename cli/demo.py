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
from typing import TypeVar

from vigil.cli.rpc import CliError
from vigil.client import Client, ClientConfig
from vigil.core.timefmt import from_proto
from vigil.core.timings import Timings
from vigil.core.vocab import (
    MACHINES_CHATROOM,
    AgentKind,
    AgentStatus,
    ExitClassification,
    NotificationKind,
    TaskStatus,
)
from vigil.v1 import machines_pb2 as mpb
from vigil.v1 import tasks_pb2 as tpb

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
        raise CliError(f"demo: gave up waiting for {what}")


async def demo(database_url: str | None) -> int:
    from vigil.testing import local_vigil

    tmp = Path(tempfile.mkdtemp(prefix="vigil-demo-"))
    logging.getLogger().setLevel(logging.WARNING)  # the story is the output, not the logs
    daemon: subprocess.Popen[bytes] | None = None
    d = Demo()
    timings = Timings.from_env(DEMO_ENV)
    try:
        if not database_url:
            d.say("starting a throwaway embedded PostgreSQL")
        async with local_vigil(tmp, timings, database_url=database_url) as vigil:
            config = ClientConfig.from_env(addr=vigil.addr, data_dir=tmp, timings=timings)
            config = config.with_token(vigil.admin_token)  # the throwaway server's admin
            async with Client(config) as client:
                try:
                    daemon = await _story(d, client, vigil.addr, tmp)
                finally:
                    if daemon is not None:
                        d.step("cleaning up")
                        daemon.send_signal(signal.SIGTERM)  # it stops its agents on the way out
                        await asyncio.to_thread(daemon.wait, 20)
                        d.say("daemon stopped (its agents stopped with it)")
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    d.say("done: nothing left running")
    return 0


async def _story(d: Demo, client: Client, addr: str, tmp: Path) -> subprocess.Popen[bytes]:
    room = "demo"
    python = json.dumps(sys.executable)
    harnesses = tmp / f"{MACHINE}.harnesses.toml"
    harnesses.write_text(
        "[harnesses]\n"
        f'example = [{python}, "-m", "vigil.example_agent"]\n'
        f'crash = [{python}, "-m", "vigil.example_agent", "--crash"]\n'
    )
    harnesses.chmod(0o600)

    d.step("1. a machine and its daemon")
    registered = await client.register_machine(MACHINE, "localhost", ["example"])
    cred = tmp / f"{MACHINE}.credential"
    fd = os.open(cred, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"machine_id": MACHINE, "credential": registered.credential}, f)
    env = {**os.environ, **DEMO_ENV, "VIGIL_ADDR": addr, "VIGIL_DATA_DIR": str(tmp)}
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
            "--harness-file",
            str(harnesses),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "daemon.log").open("wb"),
    )
    await d.until("the daemon's presence", _daemon_online(client))
    d.say(f"machine {MACHINE} registered; its daemon is online")
    remote, custom = AgentKind.REMOTE.to_pb(), AgentKind.CUSTOM.to_pb()
    await client.create_chatroom(
        room,
        [
            tpb.Role(role="builder", kind=remote, machine=MACHINE, harness="example"),
            tpb.Role(role="flaky", kind=remote, machine=MACHINE, harness="crash"),
            tpb.Role(role="reviewer", kind=custom),
        ],
    )
    d.say(
        f"chatroom {room!r}: builder (remote, example agent), flaky (remote, crashes), "
        "reviewer (custom: run by a person)"
    )

    d.step("2. a message to a remote role with no live agent")
    first = await client.send(room, "builder", "write the release notes")
    d.say(f"sent task {first.id[:8]} -> {TaskStatus.from_pb(first.status)}")
    cmds = await client.list_commands(MACHINE, 10)
    names = ", ".join(
        "start" if c.type == mpb.COMMAND_TYPE_START else "stop" for c in reversed(cmds)
    )
    d.say(f"restart issued once: {names} commands")
    a = await d.until("the agent to start", _agent(client, room, "builder", with_pid=True))
    d.say(f"daemon started the example agent: pid {a.pid}")
    await d.until("the task to complete", _task_status(client, first.id, TaskStatus.COMPLETED))
    d.say(f"task {first.id[:8]} claimed, started and completed by the agent", 1)

    d.step("3. the agent is killed in the middle of a task")
    second = await client.send(room, "builder", "refactor the parser")
    await d.until("the task in progress", _task_status(client, second.id, TaskStatus.IN_PROGRESS))
    running = await _agent(client, room, "builder", with_pid=True)()
    assert running is not None
    pid = running.pid
    d.say(f"task {second.id[:8]} in progress on pid {pid}; kill -9 {pid}")
    os.kill(pid, signal.SIGKILL)
    ex = await d.until("the exit report", _exit_of(client, room, "builder", pid))
    report_ms = (from_proto(ex.recorded_at) - from_proto(ex.exited_at)).total_seconds() * 1000
    d.say(
        f"exit reported: pid {pid}, signal {ex.signal}, classification "
        f"{_classification(ex)} ({report_ms:.1f} ms from exit to recorded)",
        1,
    )
    t = await client.get_task(second.id)
    d.say(f"task {second.id[:8]} recovered: {TaskStatus.from_pb(t.status)}, attempt {t.attempt}", 1)
    a2 = await d.until("the restart", _agent(client, room, "builder", with_pid=True, not_pid=pid))
    starts = [
        c
        for c in await client.list_commands(MACHINE, 50)
        if c.role == "builder" and c.type == mpb.COMMAND_TYPE_START
    ]
    d.say(
        f"restarted once after backoff: new pid {a2.pid} ({len(starts)} start commands so far)",
        1,
    )
    await d.until(
        "the redelivered task to complete", _task_status(client, second.id, TaskStatus.COMPLETED)
    )
    t = await client.get_task(second.id)
    d.say(f"task {second.id[:8]} completed by the new agent on attempt {t.attempt}", 1)

    d.step("4. a crash loop")
    await client.send(room, "flaky", "try the flaky thing")
    opened = await d.until(
        "the circuit to open", _agent(client, room, "flaky", status=AgentStatus.CIRCUIT_OPEN), 40
    )
    exits = sorted(from_proto(e.exited_at) for e in await client.list_exits(room, "flaky"))
    gaps = [f"{(b - a).total_seconds():.1f}s" for a, b in itertools.pairwise(exits)]
    d.say(
        f"{len(exits)} crashes, growing gaps between restarts ({', '.join(gaps)}): "
        f"circuit {AgentStatus.from_pb(opened.status)}; no restart until the cool-down",
        1,
    )
    n = await _notification(client, NotificationKind.CIRCUIT_OPEN)
    d.say(f"notification: {n}", 1)

    d.step("5. a custom role nobody is running")
    await client.send(room, "reviewer", "review the release notes")
    d.say("custom agents are never restarted: after the pending timeout a person is told")
    n = await d.until(
        "the notification", lambda: _notification(client, NotificationKind.PENDING_TIMEOUT), 20
    )
    d.say(f"notification: {n}", 1)
    return daemon


def _classification(ex: mpb.AgentExit) -> str:
    return ExitClassification.from_pb(ex.classification).value


def _daemon_online(client: Client) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        listed = await client.list_participants(MACHINES_CHATROOM, live_only=True)
        return any(p.role == MACHINE for p in listed.participants)

    return check


def _agent(
    client: Client,
    room: str,
    role: str,
    *,
    with_pid: bool = False,
    not_pid: int | None = None,
    status: AgentStatus | None = None,
) -> Callable[[], Awaitable[mpb.Agent | None]]:
    async def check() -> mpb.Agent | None:
        for a in await client.list_agents(room):
            if a.role != role:
                continue
            if with_pid and (not a.pid or a.pid == not_pid):
                return None
            if status is not None and a.status != status.to_pb():
                return None
            return a
        return None

    return check


def _exit_of(
    client: Client, room: str, role: str, pid: int
) -> Callable[[], Awaitable[mpb.AgentExit | None]]:
    async def check() -> mpb.AgentExit | None:
        return next((e for e in await client.list_exits(room, role) if e.child.pid == pid), None)

    return check


def _task_status(client: Client, task_id: str, status: TaskStatus) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await client.get_task(task_id)).status == status.to_pb()

    return check


async def _notification(client: Client, kind: NotificationKind) -> str | None:
    for n in await client.list_notifications(0, 1000):
        if n.kind == kind.to_pb():
            return f"[{kind}] {n.message}"
    return None
