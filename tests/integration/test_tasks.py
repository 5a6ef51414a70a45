"""The task service end to end: pushed delivery, exactly-once claims, timeouts and
recovery that never loops, against real PostgreSQL, servers and processes."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import grpc
import pytest

from vigil import testing as harness
from vigil.core.vocab import TaskStatus
from vigil.testing import local_server
from vigil.v1 import common_pb2
from vigil.v1 import liveness_pb2_grpc as lpb_grpc
from vigil.v1 import machines_pb2 as mpb
from vigil.v1 import machines_pb2_grpc as mpb_grpc
from vigil.v1 import tasks_pb2 as tpb
from vigil.v1 import tasks_pb2_grpc as tpb_grpc

PENDING = TaskStatus.PENDING.to_pb()
ACK = TaskStatus.ACKNOWLEDGED.to_pb()


async def _room(addr: str, name: str = "room", **kinds: str) -> None:
    roles = []
    for role, kind in (kinds or {"builder": "custom"}).items():
        if kind == "remote":
            roles.append(
                tpb.Role(role=role, kind=common_pb2.AGENT_KIND_REMOTE, machine="m1", harness="idle")
            )
        else:
            roles.append(tpb.Role(role=role, kind=common_pb2.AGENT_KIND_CUSTOM))
    async with harness.channel(addr) as ch:
        if any(kind == "remote" for kind in kinds.values()):
            await mpb_grpc.MachinesStub(ch).RegisterMachine(
                mpb.RegisterMachineRequest(machine_id="m1")
            )
        await tpb_grpc.TasksStub(ch).CreateChatroom(
            tpb.CreateChatroomRequest(name=name, roles=roles)
        )


async def _send(addr: str, text: str, role: str = "builder", room: str = "room") -> tpb.Task:
    async with harness.channel(addr) as ch:
        return await tpb_grpc.TasksStub(ch).SendMessage(
            tpb.SendMessageRequest(chatroom=room, role=role, text=text)
        )


async def _task(addr: str, task_id: str) -> tpb.Task:
    async with harness.channel(addr) as ch:
        return await tpb_grpc.TasksStub(ch).GetTask(tpb.GetTaskRequest(id=task_id))


async def _notifications(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch("SELECT * FROM tasks.notifications ORDER BY id")
    finally:
        await conn.close()


async def test_send_reaches_a_waiting_wait_for_task(db_url: str, tmp: Path) -> None:
    async with local_server(db_url, harness.fast_timings()) as srv:
        await _room(srv.addr)
        proc = await asyncio.create_subprocess_exec(
            *harness.vigil_cmd(
                "wait-for-task", "--chatroom", "room", "--role", "builder", "--json"
            ),
            env=harness.child_env({"VIGIL_ADDR": srv.addr}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        await harness.wait_live(db_url, "room", "builder")
        sent = await _send(srv.addr, "fix the flaky test")
        out, err = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, err.decode()
        import json

        got = json.loads(out)
        assert got["id"] == sent.id and got["text"] == "fix the flaky test"
        assert got["status"] == "acknowledged" and got["attempt"] == 0
        assert got["commands"]["complete"] == f"vigil task complete {sent.id} --attempt 0"
        # It left with reason task_received, and the claim is recorded as delivered.
        row = await harness.participant_row(db_url, "room", "builder")
        assert row is not None and row["offline_reason"] == "task_received"

        async def delivered() -> bool:
            conn = await asyncpg.connect(db_url)
            try:
                return bool(
                    await conn.fetchval(
                        "SELECT delivered_at IS NOT NULL FROM tasks.tasks WHERE id = $1",
                        uuid.UUID(sent.id),
                    )
                )
            finally:
                await conn.close()

        await harness.wait_for(delivered, 5, what="delivery recorded")


async def test_two_agents_500_tasks_each_delivered_exactly_once(db_url: str) -> None:
    # A role works on one task at a time: two live agents (roles a and b, each a real
    # session that joins and heartbeats) take 500 tasks sent concurrently.
    async with local_server(db_url, harness.fast_timings()) as srv:
        await _room(srv.addr, a="custom", b="custom")
        received: list[tuple[str, str]] = []
        total = 500

        async def agent(name: str) -> None:
            async with (
                harness.client(srv.addr) as client,
                client.agent("room", name, handle_signals=False) as session,
            ):
                while len(received) < total:
                    task = await session.next_task()
                    received.append((name, task.id))
                    await task.complete()

        agents = [asyncio.create_task(agent(n)) for n in ("a", "b")]
        sent = await asyncio.gather(
            *(_send(srv.addr, f"t{i}", role="ab"[i % 2]) for i in range(total))
        )

        async def all_done() -> bool:
            return len(received) >= total

        await harness.wait_for(all_done, 120, interval=0.1, what="500 deliveries")
        for a in agents:
            a.cancel()
        await asyncio.gather(*agents, return_exceptions=True)
        ids = [tid for _, tid in received]
        assert len(ids) == total and set(ids) == {t.id for t in sent}  # each once
        assert {n for n, _ in received} == {"a", "b"}  # both agents took work
        conn = await asyncpg.connect(db_url)
        claims = await conn.fetchval(
            "SELECT count(*) FROM tasks.transitions WHERE trigger = 'claimTask'"
        )
        await conn.close()
        assert claims == total


async def _claim_and_hang(addr: str, role: str = "builder") -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        harness.vigil_cmd()[0],
        "-m",
        "vigil.testing.claim_and_hang",
        addr,
        "room",
        role,
        env=harness.child_env({"VIGIL_ADDR": addr}),
        stdout=subprocess.PIPE,
    )


async def test_killed_claimer_gets_its_task_back_and_its_zombie_is_fenced(
    db_url: str,
) -> None:
    timings = harness.fast_timings(task_ack_timeout_ms=500)
    async with local_server(db_url, timings) as srv:
        await _room(srv.addr, builder="remote")
        sent = await _send(srv.addr, "build it")
        agent = await _claim_and_hang(srv.addr)
        assert agent.stdout is not None
        line = (await asyncio.wait_for(agent.stdout.readline(), 10)).decode().split()
        assert line == [sent.id, "0"]
        assert (await _task(srv.addr, sent.id)).status == ACK
        killed = time.monotonic()
        agent.send_signal(signal.SIGKILL)
        await agent.wait()

        async def recovered() -> tpb.Task | None:
            t = await _task(srv.addr, sent.id)
            return t if t.status == PENDING else None

        task = await harness.wait_for(recovered, 0.5 + 1, what="recovery")
        assert time.monotonic() - killed <= 0.5 + 1
        assert task.attempt == 1 and task.recoveries == 1
        # The zombie's completion with the old attempt changes nothing.
        async with harness.channel(srv.addr) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await tpb_grpc.TasksStub(ch).CompleteTask(tpb.TaskRef(id=sent.id, attempt=0))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "stale" in (err.value.details() or "")
            history = await tpb_grpc.TasksStub(ch).TaskHistory(tpb.TaskHistoryRequest(id=sent.id))
        assert [(t.trigger, t.attempt) for t in history.transitions] == [
            ("claimTask", 0),
            ("recoverStuckAcknowledged", 1),
        ]
        assert (await _task(srv.addr, sent.id)).status == PENDING


async def test_custom_claimer_past_timeout_is_notified_not_reset(db_url: str, tmp: Path) -> None:
    timings = harness.fast_timings(task_ack_timeout_ms=300)
    async with local_server(db_url, timings) as srv:
        await _room(srv.addr)
        agent = harness.spawn_agent(
            srv.addr, "room", "builder", tmp, env={"VIGIL_TASK_ACK_TIMEOUT_MS": "300"}
        )
        await harness.wait_live(db_url, "room", "builder")
        sent = await _send(srv.addr, "review it")
        assert await asyncio.to_thread(agent.proc.wait, 10) == 0

        async def notified() -> list[asyncpg.Record]:
            return [n for n in await _notifications(db_url) if n["kind"] == "ack_timeout"]

        found = await harness.wait_for(notified, 0.3 + 2, what="ack_timeout notification")
        assert str(found[0]["task_id"]) == sent.id
        await asyncio.sleep(1.0)  # several more timeouts: still no reset, no second notice
        task = await _task(srv.addr, sent.id)
        assert task.status == ACK and task.attempt == 0
        assert len(await notified()) == 1


@pytest.mark.parametrize("kind", ["remote", "custom"])
async def test_pending_past_timeout_without_live_agent(db_url: str, kind: str) -> None:
    timings = harness.fast_timings(task_pending_timeout_ms=300)
    async with local_server(db_url, timings) as srv:
        await _room(srv.addr, builder=kind)
        sent = await _send(srv.addr, "anyone there?")
        await asyncio.sleep(0.3 * 5)  # several timeouts pass
        task = await _task(srv.addr, sent.id)
        assert task.status == PENDING and task.attempt == 0
        conn = await asyncpg.connect(db_url)
        commands = await conn.fetch("SELECT * FROM tasks.commands ORDER BY id")
        await conn.close()
        kinds = [n["kind"] for n in await _notifications(db_url)]
        if kind == "remote":
            # One stop+start pair for the role's daemon (none runs here, so it stays
            # pending), and no second one however many timeouts pass.
            assert [(c["type"], c["status"]) for c in commands] == [
                ("stop", "pending"),
                ("start", "pending"),
            ]
            # ... and, since no daemon of m1 is online, one saying so.
            assert kinds == ["machine_offline", "restart_requested"]
        else:
            assert commands == []
            assert kinds == ["pending_timeout"]


async def test_a_task_that_keeps_failing_stops_at_the_cap_and_is_visible(db_url: str) -> None:
    timings = harness.fast_timings(task_max_attempts=2)
    async with local_server(db_url, timings) as srv:
        await _room(srv.addr, builder="remote")
        sent = await _send(srv.addr, "crashes every time")
        for attempt in range(3):
            agent = await _claim_and_hang(srv.addr)
            assert agent.stdout is not None
            line = (await asyncio.wait_for(agent.stdout.readline(), 10)).decode().split()
            assert line == [sent.id, str(attempt)]
            agent.send_signal(signal.SIGKILL)
            await agent.wait()
            if attempt < 2:

                async def back(a: int = attempt) -> bool:
                    t = await _task(srv.addr, sent.id)
                    return t.status == PENDING and t.attempt == a + 1

                await harness.wait_for(back, 3, what=f"recovery {attempt + 1}")

        async def visible() -> tpb.Task | None:
            t = await _task(srv.addr, sent.id)
            return t if t.needs_attention else None

        task = await harness.wait_for(visible, 3, what="needs_attention")
        assert task.status == ACK and task.attempt == 2  # not redelivered again
        kinds = [n["kind"] for n in await _notifications(db_url)]
        assert kinds.count("redelivery_cap") == 1
        # Nobody can claim it any more.
        agent = await _claim_and_hang(srv.addr)
        assert agent.stdout is not None
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(agent.stdout.readline(), 1.0)
        agent.kill()
        await agent.wait()


async def test_two_replicas_handle_each_due_deadline_once(db_url: str) -> None:
    timings = harness.fast_timings(task_ack_timeout_ms=300, task_pending_timeout_ms=60_000)
    n = 200
    async with local_server(db_url, timings) as one, local_server(db_url, timings) as two:
        # One role per task: a role works on one task at a time.
        await _room(one.addr, **{f"r{i}": "custom" for i in range(n)})
        conn = await asyncpg.connect(db_url)
        try:
            for i in range(n):
                await _send(one.addr if i % 2 else two.addr, f"t{i}", role=f"r{i}")
                # Claim as a live participant, then call it dead, so its deadline
                # recovers the task.
                async with harness.channel(one.addr) as ch:
                    joined = await lpb_grpc.LivenessStub(ch).Join(
                        harness.join_request("room", f"r{i}")
                    )
                    call = tpb_grpc.TasksStub(ch).AwaitTask(
                        tpb.AwaitTaskRequest(
                            chatroom="room",
                            role=f"r{i}",
                            connection_id=joined.participant.connection_id,
                            epoch=joined.participant.epoch,
                        )
                    )
                    replies = [r async for r in call]  # one task, then the stream ends
                    reply = replies[0]
                await conn.execute(
                    "UPDATE tasks.tasks SET claimer_dead_at = now(), delivered_at = now() "
                    "WHERE id = $1",
                    uuid.UUID(reply.task.id),
                )
                await asyncio.sleep(0)

            async def all_recovered() -> bool:
                count = await conn.fetchval(
                    "SELECT count(*) FROM tasks.transitions "
                    "WHERE trigger = 'recoverStuckAcknowledged'"
                )
                return count >= n

            await harness.wait_for(all_recovered, 30, what="every deadline handled")
            await asyncio.sleep(0.5)
            audit = await conn.fetch(
                "SELECT task_id, count(*) AS c FROM tasks.transitions "
                "WHERE trigger = 'recoverStuckAcknowledged' GROUP BY task_id"
            )
        finally:
            await conn.close()
        assert len(audit) == n and all(r["c"] == 1 for r in audit)
        handled = [
            srv.tasks.metrics.recoveries.labels("recoverStuckAcknowledged", "timeout")._value.get()
            for srv in (one, two)
        ]
        assert sum(handled) == n


async def test_a_killed_long_lived_session_gives_its_task_back_once(db_url: str) -> None:
    async with local_server(db_url, harness.fast_timings()) as srv:
        await _room(srv.addr)
        agent = subprocess.Popen(
            [sys.executable, "-m", "vigil.testing.agent", "work"],
            env=harness.child_env(
                {"VIGIL_ADDR": srv.addr, "VIGIL_CHATROOM": "room", "VIGIL_ROLE": "builder"}
            ),
            stdout=subprocess.PIPE,
        )
        try:
            await harness.wait_live(db_url, "room", "builder")
            sent = await _send(srv.addr, "a long job")
            assert agent.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(agent.stdout.readline), 15)
            assert line.decode().startswith(f"working on {sent.id} attempt 0")
            assert (await _task(srv.addr, sent.id)).status == TaskStatus.IN_PROGRESS.to_pb()
            agent.kill()  # mid-task: its session drops with the process
            await asyncio.to_thread(agent.wait, 10)

            async def back() -> tpb.Task | None:
                t = await _task(srv.addr, sent.id)
                return t if t.status == PENDING else None

            task = await harness.wait_for(back, 5, what="the task recovered")
            assert task.attempt == 1 and task.recoveries == 1
            # The next session takes it on its new attempt, and it ends completed.
            async with (
                harness.client(srv.addr) as client,
                client.agent("room", "builder", handle_signals=False) as session,
            ):
                again = await session.next_task()
                assert (again.id, again.attempt) == (sent.id, 1)
                await again.start()
                await again.complete()
            done = await _task(srv.addr, sent.id)
            assert done.status == TaskStatus.COMPLETED.to_pb() and done.recoveries == 1
            async with harness.client(srv.addr) as client:
                history = await client.task_history(sent.id)
            assert [h.trigger for h in history] == [
                "claimTask",
                "startTask",
                "recoverOrphaned",
                "claimTask",
                "startTask",
                "completeTask",
            ]
        finally:
            if agent.poll() is None:
                agent.kill()


async def test_a_cancelled_await_leaves_no_stray_handler_behind(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that gives up on AwaitTask while the server is still checking its claim
    (no live participant: the server waits up to 2 s for its join to arrive) ends the
    handler with the call: nothing is left to fail later unobserved."""
    import gc

    async with local_server(db_url, harness.fast_timings()) as srv:
        await harness.make_room(srv)
        async with harness.channel(srv.addr) as ch:
            call = tpb_grpc.TasksStub(ch).AwaitTask(
                tpb.AwaitTaskRequest(
                    chatroom="room", role="builder", connection_id=str(uuid.uuid4()), epoch=1
                )
            )
            reading = asyncio.ensure_future(call.read())
            await asyncio.sleep(0.3)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
        await asyncio.sleep(2.5)  # past the server's wait for the join
        gc.collect()
        await asyncio.sleep(0.1)
    assert "exception was never retrieved" not in caplog.text
