"""The machine daemon end to end: real daemon processes running real agent processes
against a real server and PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from vigil import testing as harness
from vigil.core.timefmt import to_proto
from vigil.core.vocab import AgentStatus, DesiredState, ExitClassification, TaskStatus
from vigil.testing import LocalServer, local_server
from vigil.v1 import common_pb2
from vigil.v1 import machines_pb2 as mpb
from vigil.v1 import machines_pb2_grpc as mpb_grpc
from vigil.v1 import tasks_pb2 as tpb
from vigil.v1 import tasks_pb2_grpc as tpb_grpc

# Spawns real processes (servers, agents, daemons, the CLI): not in `make test-fast`.
pytestmark = pytest.mark.slow

TIMINGS = harness.fast_timings(
    restart_backoff_base_ms=200,
    restart_backoff_cap_ms=2000,
    circuit_exits=3,
    circuit_window_ms=60_000,
    circuit_cooldown_ms=4_000,
)


def worker(mode: str) -> str:
    """The harness (in every test machine's harness file) running the test agent in `mode`."""
    assert mode in harness.AGENT_MODES
    return mode


Machine = harness.MachineDaemon


async def register(addr: str, machine_id: str, tmp: Path) -> Machine:
    return await harness.register_machine(addr, machine_id, tmp)


async def room(addr: str, harness_name: str, name: str = "room", machine: str = "m1") -> None:
    async with harness.channel(addr) as ch:
        await tpb_grpc.TasksStub(ch).CreateChatroom(
            tpb.CreateChatroomRequest(
                name=name,
                roles=[
                    tpb.Role(
                        role="builder",
                        kind=common_pb2.AGENT_KIND_REMOTE,
                        machine=machine,
                        harness=harness_name,
                    ),
                    tpb.Role(role="reviewer", kind=common_pb2.AGENT_KIND_CUSTOM),
                ],
            )
        )


async def agent(addr: str, role: str = "builder", name: str = "room") -> mpb.Agent:
    async with harness.channel(addr) as ch:
        reply = await mpb_grpc.MachinesStub(ch).ListAgents(mpb.ListAgentsRequest(chatroom=name))
    return next(a for a in reply.agents if a.role == role)


async def send(addr: str, text: str, role: str = "builder") -> tpb.Task:
    async with harness.channel(addr) as ch:
        return await tpb_grpc.TasksStub(ch).SendMessage(
            tpb.SendMessageRequest(chatroom="room", role=role, text=text)
        )


async def commands(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch("SELECT * FROM tasks.commands ORDER BY id")
    finally:
        await conn.close()


async def fetch(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def wait_agent(addr: str, pred: object, what: str, timeout: float = 10) -> mpb.Agent:
    async def check() -> mpb.Agent | None:
        a = await agent(addr)
        return a if pred(a) else None  # type: ignore[operator]

    found: mpb.Agent = await harness.wait_for(check, timeout, interval=0.005, what=what)
    return found


async def test_sigkilled_agent_exit_is_recorded_and_its_pid_cleared(db_url: str, tmp: Path) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        m = await register(srv.addr, "m1", tmp)
        await room(srv.addr, worker("idle"))
        m.start()
        try:
            await send(srv.addr, "start the agent")  # a need: nobody live -> start
            running = await wait_agent(
                srv.addr,
                lambda a: a.pid and a.status == AgentStatus.RUNNING.to_pb(),
                "agent running",
            )
            await harness.wait_live(db_url, "room", "builder")
            killed = datetime.now(UTC)
            os.kill(running.pid, signal.SIGKILL)
            after = await wait_agent(srv.addr, lambda a: a.has_last_exit, "exit recorded", 5)
            assert after.pid == 0
            assert after.last_exit_signal == 9
            assert after.last_exit_classification == ExitClassification.SIGNAL.to_pb()
            assert AgentStatus.from_pb(after.status) in ("backoff", "starting", "running")
            (row,) = await fetch(db_url, "SELECT * FROM tasks.agent_exits")
            assert row["pid"] == running.pid and row["signal"] == 9
            assert (row["recorded_at"] - killed).total_seconds() < 1.0
        finally:
            await m.kill(signal.SIGTERM)


@pytest.mark.parametrize("replicas", [1, 2])
async def test_100_concurrent_messages_make_one_stop_start_pair(
    db_url: str, tmp: Path, replicas: int
) -> None:
    timings = harness.fast_timings(task_pending_timeout_ms=1500)
    async with local_server(db_url, timings) as one, local_server(db_url, timings) as two:
        servers = [one, two][:replicas]
        m = await register(one.addr, "m1", tmp)
        await room(one.addr, worker("sleep"))  # runs, never joins: the role stays in need
        await asyncio.gather(*(send(servers[i % replicas].addr, f"t{i}") for i in range(100)))
        cmds = await commands(db_url)
        assert sorted(c["type"] for c in cmds) == ["start", "stop"]
        assert {c["status"] for c in cmds} == {"pending"}
        m.start()
        try:

            async def done() -> bool:
                return {c["status"] for c in await commands(db_url)} == {"done"}

            await harness.wait_for(done, 10, what="the pair executed")
            # Its process runs: more messages restart nothing...
            await send(one.addr, "still nobody?")
            assert len(await commands(db_url)) == 2

            # ...but it never took the pending task: past the pending timeout, that new
            # need makes a new pair (once).
            async def second_pair() -> bool:
                return [c["type"] for c in await commands(db_url)].count("start") == 2

            await harness.wait_for(second_pair, 5, what="a second restart pair")
            await asyncio.sleep(0.5)
            assert [c["type"] for c in await commands(db_url)].count("start") == 2
        finally:
            await m.kill(signal.SIGTERM)


async def test_a_crash_loop_opens_the_circuit(db_url: str, tmp: Path) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        m = await register(srv.addr, "m1", tmp)
        await room(srv.addr, worker("crash"))
        m.start()
        try:
            await send(srv.addr, "crash please")
            opened = await wait_agent(
                srv.addr, lambda a: a.status == AgentStatus.CIRCUIT_OPEN.to_pb(), "circuit open", 15
            )
            exits = await fetch(db_url, "SELECT * FROM tasks.agent_exits ORDER BY exited_at")
            assert len(exits) == 3 and all(e["classification"] == "crashed" for e in exits)
            starts = [c for c in await commands(db_url) if c["type"] == "start"]
            assert len(starts) == 3
            gaps = [
                (b["created_at"] - a["finished_at"]).total_seconds()
                for a, b in itertools.pairwise(starts)
            ]
            assert gaps[1] > gaps[0] > 0.15, gaps  # backoff grows
            kinds = [n["kind"] for n in await fetch(db_url, "SELECT * FROM tasks.notifications")]
            assert "circuit_open" in kinds
            assert opened.next_restart_at.ToDatetime(UTC) > datetime.now(UTC)
            await asyncio.sleep(1.5)  # inside the cool-down: nothing restarts
            await send(srv.addr, "and again")
            assert len([c for c in await commands(db_url) if c["type"] == "start"]) == 3
            assert (await agent(srv.addr)).status == AgentStatus.CIRCUIT_OPEN.to_pb()
        finally:
            await m.kill(signal.SIGTERM)


async def test_a_stopped_role_stays_stopped_and_custom_roles_are_never_restarted(
    db_url: str, tmp: Path
) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        await register(srv.addr, "m1", tmp)
        await room(srv.addr, worker("idle"))
        async with harness.channel(srv.addr) as ch:
            stopped = await mpb_grpc.MachinesStub(ch).StopAgent(
                mpb.AgentRef(chatroom="room", role="builder")
            )
        assert stopped.desired_state == DesiredState.STOPPED.to_pb()
        for i in range(5):
            await send(srv.addr, f"b{i}")
            await send(srv.addr, f"r{i}", role="reviewer")
        await asyncio.sleep(0.5)
        cmds = await commands(db_url)
        assert [(c["type"], c["role"]) for c in cmds] == [("stop", "builder")]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async with harness.channel(srv.addr) as ch:
                await mpb_grpc.MachinesStub(ch).StartAgent(
                    mpb.AgentRef(chatroom="room", role="reviewer")
                )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_agent_killed_mid_task_gives_the_task_to_the_next_agent(
    db_url: str, tmp: Path
) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        m = await register(srv.addr, "m1", tmp)
        await room(srv.addr, worker("work"))
        m.start()
        try:
            sent = await send(srv.addr, "long job")

            async def in_progress(attempt: int) -> tpb.Task | None:
                async with harness.channel(srv.addr) as ch:
                    t = await tpb_grpc.TasksStub(ch).GetTask(tpb.GetTaskRequest(id=sent.id))
                return (
                    t
                    if t.status == TaskStatus.IN_PROGRESS.to_pb() and t.attempt == attempt
                    else None
                )

            await harness.wait_for(lambda: in_progress(0), 15, what="first agent working")
            first = await agent(srv.addr)
            killed = datetime.now(UTC)
            os.kill(first.pid, signal.SIGKILL)

            async def recovered() -> list[asyncpg.Record]:
                return await fetch(
                    db_url,
                    "SELECT at, attempt FROM tasks.transitions "
                    "WHERE task_id = $1 AND trigger = 'recoverOrphaned'",
                    uuid.UUID(sent.id),
                )

            (rec,) = await harness.wait_for(recovered, 2, what="task back to pending")
            assert rec["attempt"] == 1
            assert (rec["at"] - killed).total_seconds() < 1.0  # pending again within a second
            await harness.wait_for(lambda: in_progress(1), 15, what="the next agent has it")
            second = await agent(srv.addr)
            assert second.pid not in (0, first.pid)
            history = await fetch(
                db_url,
                "SELECT trigger FROM tasks.transitions WHERE task_id = $1 ORDER BY id",
                uuid.UUID(sent.id),
            )
            assert [h["trigger"] for h in history] == [
                "claimTask",
                "startTask",
                "recoverOrphaned",
                "claimTask",
                "startTask",
            ]
        finally:
            await m.kill(signal.SIGTERM)


async def test_an_exit_while_the_server_is_down_is_reported_once_it_is_back(
    db_url: str, tmp: Path
) -> None:
    port = harness.free_port()
    addr = f"127.0.0.1:{port}"
    async with local_server(db_url, TIMINGS, addr) as srv:
        m = await register(srv.addr, "m1", tmp)
        await room(srv.addr, worker("sleep"))
        async with harness.channel(srv.addr) as ch:
            await mpb_grpc.MachinesStub(ch).StartAgent(
                mpb.AgentRef(chatroom="room", role="builder")
            )
        m.start()
        running = await wait_agent(srv.addr, lambda a: a.pid != 0, "agent running")
    try:
        os.kill(running.pid, signal.SIGKILL)  # no server to tell
        await asyncio.sleep(1.0)
        outbox = list((m.state / "outbox").glob("*.json"))
        assert len(outbox) == 1  # kept on disk until acknowledged
        async with local_server(db_url, TIMINGS, addr) as srv:
            await wait_agent(srv.addr, lambda a: a.has_last_exit, "exit reported", 15)
            await asyncio.sleep(1.0)
            rows = await fetch(db_url, "SELECT * FROM tasks.agent_exits")
            assert len(rows) == 1 and rows[0]["signal"] == 9
            assert list((m.state / "outbox").glob("*.json")) == []
    finally:
        await m.kill(signal.SIGTERM)


async def test_a_restarted_daemon_reconciles_its_children(db_url: str, tmp: Path) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        m = await register(srv.addr, "m1", tmp)
        async with harness.channel(srv.addr) as ch:
            await tpb_grpc.TasksStub(ch).CreateChatroom(
                tpb.CreateChatroomRequest(
                    name="room",
                    roles=[
                        tpb.Role(
                            role=r,
                            kind=common_pb2.AGENT_KIND_REMOTE,
                            machine="m1",
                            harness=worker("sleep"),
                        )
                        for r in ("builder", "keeper")
                    ],
                )
            )
            for r in ("builder", "keeper"):
                await mpb_grpc.MachinesStub(ch).StartAgent(mpb.AgentRef(chatroom="room", role=r))
        m.start()
        builder = await wait_agent(srv.addr, lambda a: a.pid != 0, "builder running")
        keeper = await harness.wait_for(lambda: _running(srv, "keeper"), 10, what="keeper running")
        await m.kill(signal.SIGKILL)  # the daemon dies; its agents keep running
        os.kill(builder.pid, signal.SIGKILL)  # one of them dies while nobody watches
        await asyncio.sleep(0.5)
        m.start()
        try:
            await wait_agent(
                srv.addr, lambda a: a.pid == 0 and a.has_last_exit, "the dead one shown dead", 10
            )
            await asyncio.sleep(0.5)
            alive = await agent(srv.addr, "keeper")
            assert alive.pid == keeper.pid and alive.status == AgentStatus.RUNNING.to_pb()
            os.kill(keeper.pid, 0)  # really still running
            rows = await fetch(db_url, "SELECT role FROM tasks.agent_exits")
            assert [r["role"] for r in rows] == ["builder"]
        finally:
            await m.kill(signal.SIGTERM)  # stops its agents intentionally


async def _running(srv: LocalServer, role: str) -> mpb.Agent | None:
    a = await agent(srv.addr, role)
    return a if a.pid else None


async def test_late_commands_expire_and_credentials_are_per_machine(db_url: str, tmp: Path) -> None:
    timings = harness.fast_timings(command_deadline_ms=300)
    async with local_server(db_url, timings) as srv:
        m1 = await register(srv.addr, "m1", tmp)
        m2 = await register(srv.addr, "m2", tmp)
        await room(srv.addr, worker("sleep"), machine="m2")
        async with harness.channel(srv.addr) as ch:
            await mpb_grpc.MachinesStub(ch).StartAgent(
                mpb.AgentRef(chatroom="room", role="builder")
            )
        await asyncio.sleep(0.6)  # past its deadline before any daemon sees it
        m2.start()
        try:

            async def expired() -> bool:
                return [c["status"] for c in await commands(db_url)] == ["expired"]

            await harness.wait_for(expired, 10, what="command expired")
            assert (await agent(srv.addr)).pid == 0  # not executed
        finally:
            await m2.kill(signal.SIGTERM)
        async with harness.channel(srv.addr, m1.credential) as ch:
            stub = mpb_grpc.MachinesStub(ch)
            report = mpb.ExitReport(
                machine_id="m2",
                child=mpb.Child(
                    chatroom="room",
                    role="builder",
                    pid=4242,
                    started_at=to_proto(datetime.now(UTC)),
                ),
                exited_at=to_proto(datetime.now(UTC)),
                classification=mpb.EXIT_CLASSIFICATION_CRASHED,
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ReportExit(report)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            report.machine_id = "m1"  # its own name, another machine's agent
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ReportExit(report)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            call = stub.DaemonSession()
            await call.write(mpb.DaemonMessage(hello=mpb.DaemonMessage.Hello(machine_id="m2")))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        forged = m1.credential[:-4] + "AAAA"
        async with harness.channel(srv.addr, forged) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await mpb_grpc.MachinesStub(ch).ReportExit(report)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert await fetch(db_url, "SELECT * FROM tasks.agent_exits") == []


async def running(addr: str) -> mpb.Agent | None:
    """room/builder, if it is shown running with a pid."""
    a = await agent(addr)
    return a if a.status == AgentStatus.RUNNING.to_pb() and a.pid else None


async def start_running(addr: str) -> mpb.Agent:
    """A person starts room/builder; the agent once it is shown running."""
    async with harness.channel(addr) as ch:
        await mpb_grpc.MachinesStub(ch).StartAgent(mpb.AgentRef(chatroom="room", role="builder"))

    async def shown() -> mpb.Agent | None:
        return await running(addr)

    started: mpb.Agent = await harness.wait_for(shown, 15, what="agent running")
    return started


async def test_a_start_while_a_stop_is_pending_shows_the_old_process_until_its_exit(
    db_url: str, tmp: Path
) -> None:
    """A person stops a frozen agent and starts it again at once (the chaos soak's
    `operator_stop` over an `agent_pause_long`): the old process has not exited, so it is
    shown running with its pid until the daemon reports its exit; then the new one runs."""
    async with local_server(db_url, TIMINGS) as srv:
        m = await register(srv.addr, "m1", tmp)
        await room(srv.addr, worker("idle"))
        m.start()
        try:
            old = await start_running(srv.addr)
            os.kill(old.pid, signal.SIGSTOP)  # its SIGTERM waits for the SIGCONT
            try:
                async with harness.channel(srv.addr) as ch:
                    stub = mpb_grpc.MachinesStub(ch)
                    await stub.StopAgent(mpb.AgentRef(chatroom="room", role="builder"))
                    await stub.StartAgent(mpb.AgentRef(chatroom="room", role="builder"))
                for _ in range(10):
                    shown = await agent(srv.addr)
                    assert (shown.status, shown.pid) == (AgentStatus.RUNNING.to_pb(), old.pid)
                    await asyncio.sleep(0.1)
            finally:
                os.kill(old.pid, signal.SIGCONT)

            async def replaced() -> mpb.Agent | None:
                a = await running(srv.addr)
                return a if a is not None and a.pid != old.pid else None

            new = await harness.wait_for(replaced, 15, what="the new agent running")
            assert new.desired_state == DesiredState.RUNNING.to_pb()
            async with harness.channel(srv.addr) as ch:
                exits = await mpb_grpc.MachinesStub(ch).ListExits(
                    mpb.ListExitsRequest(chatroom="room", role="builder")
                )
            assert [x.child.pid for x in exits.exits] == [old.pid]
        finally:
            await m.stop()


async def test_a_role_shows_its_next_process_only_once_the_previous_exit_is_recorded(
    db_url: str, tmp: Path
) -> None:
    """A stop and a start of a role (a restart): its exit report is on its way (made
    slow here) when the start arrives; the daemon reports the exit first, so the agent is
    never shown with the new pid while the old process's exit is unrecorded (the chaos
    soak's invariant 6, seed 34)."""
    async with local_server(db_url, TIMINGS) as srv:
        m = await register(srv.addr, "m1", tmp)
        await room(srv.addr, worker("idle"))
        m.start()
        try:
            old = await start_running(srv.addr)
            agents = srv.tasks.svc.agents
            record_exit = agents.report_exit

            async def slowly(*args: Any) -> Any:
                await asyncio.sleep(0.8)
                return await record_exit(*args)

            agents.report_exit = slowly  # type: ignore[method-assign,assignment]
            async with harness.channel(srv.addr) as ch:
                stub = mpb_grpc.MachinesStub(ch)
                await stub.StopAgent(mpb.AgentRef(chatroom="room", role="builder"))
                await stub.StartAgent(mpb.AgentRef(chatroom="room", role="builder"))
                loop = asyncio.get_running_loop()
                give_up = loop.time() + 15
                while True:
                    shown = await running(srv.addr)
                    if shown is not None and shown.pid != old.pid:
                        break
                    assert loop.time() < give_up, "the new agent never ran"
                    await asyncio.sleep(0.01)
                exits = await stub.ListExits(mpb.ListExitsRequest(chatroom="room", role="builder"))
            assert [x.child.pid for x in exits.exits] == [old.pid]
        finally:
            await m.stop()


async def test_a_start_waiting_behind_a_frozen_stop_is_not_run_after_a_later_stop(
    db_url: str, tmp: Path
) -> None:
    """stop (the process frozen: the stop waits), start, stop again, then the process
    thaws: the start, issued before the second stop, must not run (the soak's invariant
    8 caught it running: a role a person stopped was started)."""
    async with local_server(db_url, TIMINGS) as srv:
        m = await register(srv.addr, "m1", tmp)
        await room(srv.addr, worker("idle"))
        m.start()
        try:
            ref = mpb.AgentRef(chatroom="room", role="builder")
            old = await start_running(srv.addr)
            os.kill(old.pid, signal.SIGSTOP)
            try:
                async with harness.channel(srv.addr) as ch:
                    stub = mpb_grpc.MachinesStub(ch)
                    await stub.StopAgent(ref)
                    await stub.StartAgent(ref)
                    await stub.StopAgent(ref)
                await asyncio.sleep(0.5)
            finally:
                os.kill(old.pid, signal.SIGCONT)

            async def settled() -> list[asyncpg.Record] | None:
                cmds = await commands(db_url)
                return cmds if all(c["status"] in ("done", "failed") for c in cmds) else None

            cmds = await harness.wait_for(settled, 15, what="every command answered")
            # The second stop finds the first still open (one per role and type): the
            # start between them is withdrawn, and its daemon does not run it.
            assert [(c["type"], c["status"]) for c in cmds] == [
                ("start", "done"),
                ("stop", "done"),
                ("start", "failed"),
            ], cmds
            assert cmds[-1]["message"].startswith("withdrawn: "), cmds[-1]["message"]
            await asyncio.sleep(1.0)  # nothing starts later either
            shown = await agent(srv.addr)
            assert shown.desired_state == DesiredState.STOPPED.to_pb()
            assert shown.status == AgentStatus.STOPPED.to_pb() and not shown.pid, shown
            async with harness.channel(srv.addr) as ch:
                exits = await mpb_grpc.MachinesStub(ch).ListExits(
                    mpb.ListExitsRequest(chatroom="room", role="builder")
                )
            assert [x.child.pid for x in exits.exits] == [old.pid]  # nothing else ran
        finally:
            await m.stop()
