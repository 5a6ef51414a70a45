"""What Vigil shows is true, with real daemons and agents: a frozen machine's commands
stay pending and everything says the machine is offline; a start that cannot run says
why everywhere; a stopped role with waiting tasks and an agent that exits at once are
not silent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vigil import testing as harness
from vigil.core.vocab import AgentStatus, CommandStatus, CommandType, NotificationKind
from vigil.testing import LocalServer, local_server
from vigil.v1 import common_pb2
from vigil.v1 import machines_pb2 as mpb
from vigil.v1 import tasks_pb2 as tpb

# Spawns real processes (servers, agents, daemons, the CLI): not in `make test-fast`.
pytestmark = pytest.mark.slow

TIMINGS = harness.fast_timings(
    restart_backoff_base_ms=100,
    restart_backoff_cap_ms=200,
    circuit_exits=3,
    circuit_window_ms=60_000,
    circuit_cooldown_ms=60_000,
)


async def remote_role(srv: LocalServer, role: str, harness_name: str, machine: str = "m1") -> None:
    async with harness.client(srv.addr) as admin:
        await admin.create_chatroom(
            f"room-{role}",
            [
                tpb.Role(
                    role=role,
                    kind=common_pb2.AGENT_KIND_REMOTE,
                    machine=machine,
                    harness=harness_name,
                )
            ],
        )


async def cli_json(addr: str, *args: str) -> Any:
    proc = await asyncio.create_subprocess_exec(
        *harness.vigil_cmd(*args, "--json"),
        env=harness.child_env({"VIGIL_ADDR": addr}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def notes(srv: LocalServer, kind: NotificationKind) -> list[tpb.Notification]:
    async with harness.client(srv.addr) as admin:
        return [n for n in await admin.list_notifications() if n.kind == kind.to_pb()]


async def agent_of(srv: LocalServer, room: str) -> mpb.Agent:
    async with harness.client(srv.addr) as admin:
        (agent,) = await admin.list_agents(room)
    return agent


async def machine_online(srv: LocalServer, machine: str) -> bool:
    async with harness.client(srv.addr) as admin:
        return any(m.online for m in await admin.list_machines() if m.machine_id == machine)


async def test_a_frozen_machine_keeps_its_commands_pending_and_says_it_is_offline(
    db_url: str, tmp: Path
) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        m1 = await harness.register_machine(srv.addr, "m1", tmp)
        m1.start()
        try:
            await remote_role(srv, "builder", "idle")
            await harness.wait_for(lambda: machine_online(srv, "m1"), 15, what="m1 online")
            assert m1.proc is not None
            os.kill(m1.proc.pid, signal.SIGSTOP)
            await harness.wait_for(lambda: _not(machine_online(srv, "m1")), 10, what="m1 offline")
            async with harness.client(srv.addr) as admin:
                await admin.send("room-builder", "builder", "build it")
            await asyncio.sleep(1.5)  # time enough to deliver, were the daemon able to
            commands = await cli_json(srv.addr, "commands", "--machine", "m1")
            assert commands and all(c["status"] == "pending" for c in commands), commands
            agent = await agent_of(srv, "room-builder")
            assert agent.status == AgentStatus.WAITING_FOR_MACHINE.to_pb()
            assert "machine m1 is offline" in agent.status_reason
            offline = await notes(srv, NotificationKind.MACHINE_OFFLINE)
            assert [n.role for n in offline] == ["builder"]

            os.kill(m1.proc.pid, signal.SIGCONT)

            async def running() -> mpb.Agent | None:
                a = await agent_of(srv, "room-builder")
                return a if a.status == AgentStatus.RUNNING.to_pb() else None

            started = await harness.wait_for(running, 20, what="the agent started")
            await asyncio.sleep(1.0)
            async with harness.client(srv.addr) as admin:
                starts = [
                    c
                    for c in await admin.list_commands("m1")
                    if c.type == CommandType.START.to_pb()
                ]
            assert [c.status for c in starts] == [CommandStatus.DONE.to_pb()]  # started once
            assert (await agent_of(srv, "room-builder")).pid == started.pid
        finally:
            if m1.proc is not None and m1.proc.poll() is None:
                os.kill(m1.proc.pid, signal.SIGCONT)
            await m1.stop()


async def _not(check: object) -> bool:
    return not await check  # type: ignore[misc]


async def test_a_start_that_cannot_run_says_why_everywhere(db_url: str, tmp: Path) -> None:
    timings = harness.fast_timings(command_deadline_ms=3000)
    async with local_server(db_url, timings) as srv:
        m1 = await harness.register_machine(srv.addr, "m1", tmp)
        with m1.harnesses.open("a") as f:
            f.write('missing = ["/nonexistent/claude", "--print"]\n')
        m1.start()
        try:
            await remote_role(srv, "builder", "missing")
            async with harness.client(srv.addr) as admin:
                await admin.send("room-builder", "builder", "build it")

            async def failed() -> mpb.Agent | None:
                a = await agent_of(srv, "room-builder")
                return a if a.status == AgentStatus.FAILED.to_pb() else None

            await harness.wait_for(failed, 15, what="the start failed")
            commands = await cli_json(srv.addr, "commands", "--machine", "m1")
            start = next(c for c in commands if c["type"] == "start")
            assert start["status"] == "failed"
            assert "No such file or directory" in start["outcome"]
            assert start["reason"] != start["outcome"]  # why it was sent vs what happened
            agents = await cli_json(srv.addr, "agents", "--chatroom", "room-builder")
            assert agents[0]["status"] == "failed"
            assert "No such file or directory" in agents[0]["status_reason"]
            failures = await notes(srv, NotificationKind.COMMAND_FAILED)
            assert len(failures) == 1 and "No such file or directory" in failures[0].message
        finally:
            await m1.stop()

        # A start that reaches its machine after its deadline is reported expired, and
        # that raises a notification too.
        m2 = await harness.register_machine(srv.addr, "m2", tmp)
        await remote_role(srv, "late", "idle", machine="m2")
        async with harness.client(srv.addr) as admin:
            await admin.start_agent("room-late", "late")
        await asyncio.sleep(3.5)  # past the deadline before any daemon sees it
        m2.start()
        try:

            async def expired() -> list[tpb.Notification]:
                return [
                    n for n in await notes(srv, NotificationKind.COMMAND_FAILED) if n.role == "late"
                ]

            found = await harness.wait_for(expired, 15, what="the expiry notification")
            assert "expired" in found[0].message
            agent = await agent_of(srv, "room-late")
            assert agent.status == AgentStatus.FAILED.to_pb() and "expired" in agent.status_reason
        finally:
            await m2.stop()


async def test_a_stopped_role_with_waiting_tasks_and_an_agent_that_exits_at_once(
    db_url: str, tmp: Path
) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        m1 = await harness.register_machine(srv.addr, "m1", tmp)
        with m1.harnesses.open("a") as f:
            f.write(f'quits = [{json.dumps(sys.executable)}, "-c", "pass"]\n')
        m1.start()
        try:
            # A person stopped the role; ten tasks are sent to it: one notification.
            await remote_role(srv, "stopped", "idle")
            async with harness.client(srv.addr) as admin:
                await admin.stop_agent("room-stopped", "stopped")
                for i in range(10):
                    await admin.send("room-stopped", "stopped", f"task {i}")
            stopped = await notes(srv, NotificationKind.ROLE_STOPPED)
            assert len(stopped) == 1 and stopped[0].role == "stopped"
            assert "vigil agent start" in stopped[0].message

            # An agent that exits 0 at once is not restarted for ever: it backs off
            # and its circuit opens after VIGIL_CIRCUIT_EXITS of them.
            await remote_role(srv, "quits", "quits")
            async with harness.client(srv.addr) as admin:
                await admin.send("room-quits", "quits", "do something")

            async def circuit_open() -> mpb.Agent | None:
                a = await agent_of(srv, "room-quits")
                return a if a.status == AgentStatus.CIRCUIT_OPEN.to_pb() else None

            agent = await harness.wait_for(circuit_open, 30, what="the circuit to open")
            assert agent.last_exit_code == 0
            opened = await notes(srv, NotificationKind.CIRCUIT_OPEN)
            assert len(opened) == 1 and "minimum uptime" in opened[0].message
            async with harness.client(srv.addr) as admin:
                exits = await admin.list_exits("room-quits", "quits")
            assert len(exits) == 3  # and no more: the circuit holds
        finally:
            await m1.stop()
